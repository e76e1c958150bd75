"""The baseline of bench/transition.py: what any relaunch pays, with no training at all.

Started by the same `deepspeed` launcher command as a harness stage. Each rank imports torch
and DeepSpeed and joins the process group, then leaves the way the worker does; rank 0
writes when each of those moments came (wall time), to compare with the harness's relaunch.
"""
import time

script_start = time.time()  # before any import: the launcher's own share ends here

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402

import deepspeed  # noqa: E402
import deepspeed.comm as dist  # noqa: E402
import torch  # noqa: E402,F401

imported = time.time()
parser = argparse.ArgumentParser()
parser.add_argument("--stamps", required=True, help="rank 0 writes its times here (JSON)")
parser.add_argument("--backend", choices=["gloo", "nccl"], required=True)
parser.add_argument("--local_rank", type=int, default=None, help="passed by the deepspeed launcher")
args = parser.parse_args()
deepspeed.init_distributed(dist_backend=args.backend)
dist.barrier()
ready = time.time()
if dist.get_rank() == 0:
    with open(args.stamps, "w") as f:
        json.dump({"script_start": script_start, "imported": imported, "ready": ready}, f)
dist.barrier()
os._exit(0)
