"""One FlowMatch Euler step of :func:`kelix_fast.runtime.flow.sample_latents`, eager or as a CUDA graph.

A step is the DiT velocity (the conditional branch alone, or the CFG pair in one batch and combined),
then ``x + dt * v`` in float32 rounded back to the model dtype. At 1024 px that is a few hundred kernel
launches for about 5 ms of arithmetic on an H100/H200: the official step (60 ms) is bound by the host
issuing them. With ``cuda_graph`` the step is captured once over static buffers (the latents, the
timestep and ``dt``) and every later step is one replay.
"""

from __future__ import annotations

import torch

from kelix_fast import ops
from kelix_fast.models.dit import DiTCondition, KelixDiT
from kelix_fast.runtime.graphs import capture_graph


class EulerStep:
    """Advance latents by one Euler step of the flow (see the module docstring).

    Args:
        dit: the model. condition: the prepared condition of ``branches * B`` rows (the null
            conditions first when ``guidance_scale != 1``), kept alive for the graph's lifetime.
        latents: [B, C, h, w] in the model dtype and device: the first step's input, copied.
        guidance_scale: 1.0 runs the conditional branch only; else ``v_u + g * (v_c - v_u)``.
        cuda_graph: capture the step at its first call and replay it afterwards (CUDA models only).
    """

    def __init__(
        self,
        dit: KelixDiT,
        condition: DiTCondition,
        latents: torch.Tensor,
        *,
        guidance_scale: float,
        cuda_graph: bool,
    ) -> None:
        if cuda_graph and latents.device.type != "cuda":
            raise ValueError(f"EulerStep: cuda_graph=True needs a CUDA model, got {latents.device}")
        self.dit, self.condition, self.guidance_scale = dit, condition, guidance_scale
        self.branches = 1 if guidance_scale == 1.0 else 2
        self.cuda_graph = cuda_graph
        self.graph: torch.cuda.CUDAGraph | None = None
        # Static buffers: the graph reads and writes these addresses at every replay.
        self.latents = latents.clone()
        self.timestep = torch.zeros(
            self.branches * latents.shape[0], dtype=torch.float32, device=latents.device
        )
        self.dt = torch.zeros((), dtype=torch.float32, device=latents.device)

    def __call__(self, timestep: torch.Tensor, dt: float) -> torch.Tensor:
        """Step the held latents from ``timestep`` (a float32 scalar tensor on the model's device) by
        ``dt`` (sigma_next - sigma). Returns the new latents: the held buffer itself, which the next
        step overwrites (copy it to keep it); :meth:`replace` substitutes it."""
        self.timestep.copy_(timestep.expand_as(self.timestep))
        self.dt.fill_(dt)
        with ops.trusted_values():  # the inputs were checked by sample_latents; no host reads
            if not self.cuda_graph:
                self._step()
            elif self.graph is not None:
                self.graph.replay()
            else:  # the warm-up is a real step: the latents advance once
                self.graph = capture_graph(self._step)
        return self.latents

    def replace(self, latents: torch.Tensor) -> None:
        """Continue from ``latents`` (a callback's replacement, already checked) instead."""
        self.latents.copy_(latents)

    def _step(self) -> None:
        latents = self.latents
        velocity = self.dit.predict_velocity(
            latents.repeat(self.branches, 1, 1, 1), self.timestep, self.condition
        )
        if self.branches == 2:
            v_null, v_cond = velocity.chunk(2)
            velocity = v_null + self.guidance_scale * (v_cond - v_null)
        # float32 update rounded to the model dtype, as the official loop; dt a float32 scalar as the
        # Python float it replaces is in a float32 multiply.
        latents.copy_((latents.float() + self.dt * velocity.float()).to(latents.dtype))
