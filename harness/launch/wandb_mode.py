"""Which W&B mode a run uses. No torch: the launch side resolves it once and exports
WANDB_MODE to every rank (DeepSpeed's own wandb monitor reads it from the environment)."""
from __future__ import annotations

import netrc
import os
from urllib.parse import urlparse


def resolve_mode(mode: str, env: dict[str, str] | None = None) -> str:
    """The plan's mode; 'auto' is WANDB_MODE when set, else online with an API key, else offline."""
    env = os.environ if env is None else env
    if mode != "auto":
        return mode
    if env.get("WANDB_MODE") in ("online", "offline", "disabled"):
        return env["WANDB_MODE"]
    return "online" if api_key_configured(env) else "offline"


def api_key_configured(env: dict[str, str]) -> bool:
    """WANDB_API_KEY is set, or the netrc file (what `wandb login` writes) has the W&B host."""
    if env.get("WANDB_API_KEY"):
        return True
    host = urlparse(env.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    path = env.get("NETRC") or os.path.join(env.get("HOME") or os.path.expanduser("~"), ".netrc")
    try:
        entry = netrc.netrc(path).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])
