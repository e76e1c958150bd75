"""Carrying out a stage's fast path (stage.fast, decided by harness/stages/fast.py): the attention kernel,
Liger's kernels and activation checkpointing (stage.activation_checkpointing) go into the model
before the engine is built, compilation onto the engine after. A part that fails to initialise is
turned off with one warning line naming it, and the stage trains without it; the manifest records
what ran (`FastRecord`).

Compilation fails late: torch.compile only traces at the first forward. That forward runs under
`first_forward`, which on a compile error turns compilation off and runs the batch eagerly (a
failed trace changes no state). Eval and generation always run eagerly: generation's shapes
change every token, each a recompile.
"""
from __future__ import annotations

import importlib.util
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from harness.records import FastRecord
from harness.stages import Stage
from harness.worker.adapter import base_model

ATTENTION = {"sdpa": "sdpa", "eager": "eager", "flash": "flash_attention_2", "flash-or-sdpa": "flash_attention_2"}


class FastPath:
    """One stage's fast path on one rank: what is on, what fell back and why."""

    def __init__(self, stage: Stage, is_rank0: bool):
        self.stage = stage
        self.choice = stage.fast
        self.is_rank0 = is_rank0
        self.fallbacks: dict[str, str] = {}
        self.attention = "sdpa"
        self.liger = False
        self.compiled = False
        self.checkpointing = "off"
        self.compile_seconds: float | None = None
        """The first compiled forward's time (tracing and compiling included), on this rank."""
        self._engine = None
        self._traced = False
        for note in self.choice.notes:
            self._say(note)

    def _say(self, text: str) -> None:
        if self.is_rank0:
            print(f"[harness] stage {self.stage.index:02d} fast: {text}", flush=True)

    def _fall_back(self, part: str, why: str) -> None:
        why = " ".join(why.split("\n\n")[0].split())[:240]  # torch's errors go on with advice after a blank line
        self.fallbacks[part] = why
        self._say(f"{part} off: {why}")

    # ---- before deepspeed.initialize --------------------------------------------
    def prepare_model(self, model: torch.nn.Module) -> None:
        """The attention kernel, then Liger's kernels, on the model instance (an adapter's base)."""
        model = base_model(model)
        wanted = self.choice.attention
        if wanted == "flash-or-sdpa" and importlib.util.find_spec("flash_attn") is None:
            wanted = "sdpa"  # fast: auto asks for flash attention only where it is installed
        try:
            model.set_attn_implementation(ATTENTION[wanted])
            self.attention = wanted
        except (ImportError, ValueError) as error:
            self._fall_back("flash attention", f"{error}; sdpa instead")
            model.set_attn_implementation("sdpa")
        if self.choice.liger:
            self.liger = self._apply_liger(model)
        if self.stage.recompute_every:
            self.checkpointing = self._apply_checkpointing(model)

    def _apply_checkpointing(self, model: torch.nn.Module) -> str:
        """Every k-th decoder layer's forward runs again in the backward instead of keeping its
        activations (transformers' GradientCheckpointingLayer). Non-reentrant, transformers' default:
        the reentrant form drops the gradients of inputs that do not require them and needs every
        layer input to require grad. With frozen parameters under ZeRO-3 non-reentrant recompute
        crashed ("Recomputed values ... have different metadata") until DeepSpeed #8148, which 0.19.8
        has: it attributes a frozen parameter gathered during a recompute to the backward."""
        every = self.stage.recompute_every
        try:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False}, every_n_layers=every)
        except ValueError as error:  # transformers: the architecture has no checkpointable layers
            self._fall_back("activation checkpointing", str(error))
            return "off"
        return "full" if every == 1 else f"selective (every {every})"

    def _apply_liger(self, model: torch.nn.Module) -> bool:
        try:
            from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN, _apply_liger_kernel_to_instance
        except ImportError as error:
            self._fall_back("liger", f"liger-kernel is not installed (pip install 'phased-harness[gpu]'): {error}")
            return False
        model_type = getattr(model.config, "model_type", None)
        if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
            self._fall_back("liger", f"liger-kernel has no kernels for model type {model_type!r}")
            return False
        try:
            # Fused linear cross-entropy: the loss straight from the last hidden states, no logits.
            _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=True)
        except Exception as error:  # any failure inside a third-party patcher: train without it
            self._fall_back("liger", f"{type(error).__name__}: {error}")
            return False
        return True

    # ---- after deepspeed.initialize ---------------------------------------------
    def compile(self, engine) -> None:
        """engine.compile() (DeepCompile when the config asks for it); the trace comes at the first forward."""
        self._engine = engine
        if self.choice.compile == "off":
            return
        torch._dynamo.config.suppress_errors = False  # the first forward must see a failure (first_forward)
        try:
            engine.compile()
            self.compiled = True
        except Exception as error:
            self._fall_back(self._compile_part, f"{type(error).__name__}: {error}")

    def first_forward(self, forward):
        """forward() for the stage's first micro batch: on a compile error, compilation goes off
        and the batch runs eagerly."""
        if not self.compiled or self._traced:
            return forward()
        self._traced = True
        started = time.perf_counter()
        try:
            result = forward()
        except Exception as error:  # inductor and dynamo raise many types (BackendCompilerFailed, CalledProcessError, ...)
            self._uncompile()
            self._fall_back(self._compile_part, f"the first compiled forward failed ({type(error).__name__}: {error}); eager instead")
            return forward()
        self.compile_seconds = time.perf_counter() - started
        # A graph dynamo cannot compile later (a new fine-tune row length, say) then runs eagerly
        # instead of failing the run.
        torch._dynamo.config.suppress_errors = True
        return result

    @property
    def _compile_part(self) -> str:
        return "deepcompile" if self.choice.compile == "deepcompile" else "compile"

    def _uncompile(self) -> None:
        module = self._engine.module
        module._compiled_call_impl = None  # what nn.Module.compile() set: calls go to the module again
        self._engine._is_compiled = False
        self.compiled = False
        torch._dynamo.reset()

    @contextmanager
    def eager(self) -> Iterator[None]:
        """Calls of the module run uncompiled inside the block (eval, generation)."""
        module = self._engine.module if self._engine is not None else None
        saved = getattr(module, "_compiled_call_impl", None)
        if saved is None:
            yield
            return
        module._compiled_call_impl = None
        try:
            yield
        finally:
            module._compiled_call_impl = saved

    def record(self) -> FastRecord:
        """What ran, for the manifest."""
        compiled = self.choice.compile if self.compiled else "off"
        return FastRecord(compile=compiled, liger=self.liger, attention=self.attention, activation_checkpointing=self.checkpointing,
                          fallbacks=self.fallbacks, notes=self.choice.notes, first_compiled_forward_s=self.compile_seconds)
