"""Multi-task loss balancing: how the per-task losses L [K] combine into the one loss the model trains on.

``loss.balancing`` picks one of

    static       total = sum_k lw_k * L_k                      (lw: spec.tasks[t].loss_weight)
    uncertainty  total = sum_k p_k * lw_k * (exp(-s_k) * L_k + s_k)
                 Kendall et al. 2018 in the common simplified form (s_k = log sigma_k^2, no 1/2 factors),
                 learned log-variances s_k (init 0); p_k = 1 if task k has rows in the global batch, else 0,
                 so an absent task contributes nothing, not even its + s_k
    gradnorm     total = sum_k w_k * L_k                       (Chen et al. 2018)
                 w (init lw rescaled to sum K) is not trained by the total: after each optimizer step it
                 takes one Adam step down sum_k |G_k - target_k|, with G_k = w_k * ||dL_k/dW|| at a shared
                 weight W, target_k = mean(G) * r_k ** alpha, r_k = (L_k / L_k(0)) / mean(L / L(0)),
                 target treated as constant; then w >= 1e-3 and w is rescaled to sum K again
                 (a task absent from the global batch gets a zero gradient that step)

The balancer is kept apart from :class:`~unirec.model.MultiTaskRanker`: its parameters are optimised by its
own optimizer and checkpointed with the training state, never exported with the model.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from unirec.config import LossConfig

BALANCERS = ("static", "uncertainty", "gradnorm")
# GradNorm weights stay positive: a weight at zero or below would stop (or reverse) a task's training.
_MIN_WEIGHT = 1e-3


def check_loss_config(cfg: LossConfig) -> None:
    """Fail at start, naming the key, on a balancing the loop cannot run."""
    if cfg.balancing not in BALANCERS:
        raise ValueError(f"loss.balancing must be one of {', '.join(BALANCERS)}; got {cfg.balancing!r}")
    for key in ("uncertainty_lr", "gradnorm_lr"):
        if not getattr(cfg, key) > 0:
            raise ValueError(f"loss.{key} must be > 0, got {getattr(cfg, key)}")
    if cfg.gradnorm_alpha < 0:
        raise ValueError(f"loss.gradnorm_alpha must be >= 0, got {cfg.gradnorm_alpha}")


def task_grad_norms(
    losses: torch.Tensor,
    weight: torch.Tensor,
    all_mean: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> torch.Tensor:
    """||dL_k/dW|| of each task's loss at one shared weight, by K partial backward passes (graph retained).

    Args:
        losses: [K] per-task losses, still attached to the graph.
        weight: a parameter every task's loss flows through.
        all_mean: under DDP, averages a tensor over ranks. The per-rank gradients are averaged *before* the
            norm, so the result is the norm of the global batch's gradient, identical on every rank.

    Returns:
        [K] gradient norms (0 for a task with no rows), detached.

    Example:
        >>> w = torch.tensor([3.0, 4.0], requires_grad=True)
        >>> task_grad_norms(torch.stack([w.sum(), (2 * w[0]) ** 2]), w).tolist()
        [1.4142135381698608, 24.0]
    """
    grads = []
    for loss in losses:
        (g,) = torch.autograd.grad(loss, weight, retain_graph=True, allow_unused=True)
        grads.append(torch.zeros_like(weight) if g is None else g)
    flat = torch.stack(grads).flatten(1).float()
    if all_mean is not None:
        flat = all_mean(flat)
    return flat.norm(dim=1).detach()


class LossBalancer(nn.Module):
    """Static balancing, and the interface of the learned ones.

    Args:
        loss_weights: [K] each task's configured loss_weight.
        task_names: the K task names, in head order.

    Shapes (K tasks):
        total(losses [K], counts [K]) -> scalar; weights() -> [K] effective multiplier of each L_k

    Example:
        >>> b = LossBalancer(torch.tensor([1.0, 0.5]), ["home", "search"])
        >>> b.total(torch.tensor([2.0, 2.0]), torch.tensor([3.0, 0.0])).item(), b.weights().tolist()
        (3.0, [1.0, 0.5])
    """

    name = "static"
    needs_grad_norms = False
    """Whether :meth:`update` needs the tasks' gradient norms on every step."""

    def __init__(self, loss_weights: torch.Tensor, task_names: Sequence[str]):
        super().__init__()
        if loss_weights.shape != (len(task_names),):
            raise ValueError(f"{len(task_names)} tasks but loss_weights of shape {tuple(loss_weights.shape)}")
        self.task_names = list(task_names)
        self.register_buffer("loss_weights", loss_weights.detach().clone().float())
        self.optimizer: Optional[torch.optim.Optimizer] = None

    def total(self, losses: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """The loss to backpropagate: sum_k lw_k * L_k (a task absent from the batch has L_k = 0)."""
        return (losses * self.loss_weights).sum()

    def weights(self) -> torch.Tensor:
        """[K] the multiplier of each L_k in the total now (detached)."""
        return self.loss_weights.clone()

    def grads(self) -> List[torch.Tensor]:
        """Gradients of the balancer's own parameters left by the last backward pass."""
        return [p.grad for p in self.parameters() if p.grad is not None]

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=set_to_none)

    def update(self, losses: torch.Tensor, counts: torch.Tensor, grad_norms: Optional[torch.Tensor]) -> None:
        """Step the balancer after a taken optimizer step (never after a skipped one).

        Args:
            losses, counts: [K] of the global batch (identical on every rank).
            grad_norms: [K] ||dL_k/dW|| of the global batch, or None when not computed.
        """

    def state_dict(self) -> Dict[str, Any]:  # type: ignore[override]
        """Everything a resumed run needs: tensors, optimizer state, and what wrote them."""
        return {
            "balancing": self.name,
            "tasks": list(self.task_names),
            "tensors": super().state_dict(),
            "optimizer": None if self.optimizer is None else self.optimizer.state_dict(),
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:  # type: ignore[override]
        if state["balancing"] != self.name:
            raise ValueError(
                f"the checkpoint was written with loss.balancing={state['balancing']}; resume it with "
                f"that setting, not loss.balancing={self.name}"
            )
        if state["tasks"] != self.task_names:
            raise ValueError(f"the checkpoint's balancer has tasks {state['tasks']}, not {self.task_names}")
        super().load_state_dict(state["tensors"])
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])


class UncertaintyBalancer(LossBalancer):
    """Kendall et al. 2018: total = sum_k p_k * lw_k * (exp(-s_k) * L_k + s_k), s_k learned (init 0).

    Example:
        >>> b = UncertaintyBalancer(torch.ones(2), ["home", "search"], lr=0.1)
        >>> b.total(torch.tensor([2.0, 5.0]), torch.tensor([3.0, 0.0])).item()
        2.0
    """

    name = "uncertainty"

    def __init__(self, loss_weights: torch.Tensor, task_names: Sequence[str], lr: float):
        super().__init__(loss_weights, task_names)
        self.log_var = nn.Parameter(torch.zeros_like(self.loss_weights))
        self.optimizer = torch.optim.Adam([self.log_var], lr=lr)

    def total(self, losses: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        s = self.log_var
        per_task = self.loss_weights * (torch.exp(-s) * losses + s)
        return torch.where(counts > 0, per_task, torch.zeros_like(per_task)).sum()

    def weights(self) -> torch.Tensor:
        return (self.loss_weights * torch.exp(-self.log_var)).detach()

    def update(self, losses: torch.Tensor, counts: torch.Tensor, grad_norms: Optional[torch.Tensor]) -> None:
        self.optimizer.step()


class GradNormBalancer(LossBalancer):
    """Chen et al. 2018: total = sum_k w_k * L_k, w stepped towards equal (rate-adjusted) gradient norms.

    Example:
        >>> b = GradNormBalancer(torch.ones(2), ["home", "search"], lr=0.1, alpha=1.5)
        >>> b.update(torch.tensor([1.0, 1.0]), torch.ones(2), grad_norms=torch.tensor([4.0, 1.0]))
        >>> [round(w, 4) for w in b.weights().tolist()]  # the task with the smaller norm gains weight
        [0.9, 1.1]
    """

    name = "gradnorm"
    needs_grad_norms = True

    def __init__(self, loss_weights: torch.Tensor, task_names: Sequence[str], lr: float, alpha: float):
        super().__init__(loss_weights, task_names)
        k = len(self.task_names)
        self.alpha = alpha
        self.weight = nn.Parameter(self.loss_weights * k / self.loss_weights.sum())
        # L_k(0): the loss of the first step in which task k appeared.
        self.register_buffer("initial_loss", torch.zeros_like(self.loss_weights))
        self.register_buffer("seen", torch.zeros_like(self.loss_weights, dtype=torch.bool))
        self.optimizer = torch.optim.Adam([self.weight], lr=lr)

    def total(self, losses: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        # w is a constant here: only update() moves it.
        return (losses * self.weight.detach()).sum()

    def weights(self) -> torch.Tensor:
        return self.weight.detach().clone()

    def update(self, losses: torch.Tensor, counts: torch.Tensor, grad_norms: Optional[torch.Tensor]) -> None:
        if grad_norms is None:
            raise ValueError("loss.balancing=gradnorm needs the tasks' gradient norms on every step")
        present = counts > 0
        first = present & ~self.seen
        self.initial_loss[first] = losses[first].detach().float()
        self.seen |= present
        if not present.any():
            return
        self.weight.grad = self.l1_gap_grad(losses.detach().float(), grad_norms.float(), present)
        self.optimizer.step()
        with torch.no_grad():
            self.weight.clamp_(min=_MIN_WEIGHT)
            self.weight.mul_(len(self.task_names) / self.weight.sum())

    def l1_gap_grad(self, losses: torch.Tensor, norms: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """[K] d/dw_k sum_k |G_k - target_k| = sign(G_k - target_k) * ||dL_k/dW|| over the present tasks
        (0 for the others), the targets held constant."""
        g = self.weight.detach() * norms
        rate = losses / self.initial_loss.clamp_min(1e-12)
        r = rate / rate[present].mean().clamp_min(1e-12)
        target = g[present].mean() * r.clamp_min(0) ** self.alpha
        return torch.where(present, torch.sign(g - target) * norms, torch.zeros_like(norms))


def build_balancer(cfg: LossConfig, loss_weights: torch.Tensor, task_names: Sequence[str]) -> LossBalancer:
    """The balancer ``loss.balancing`` names, on the device of ``loss_weights`` [K].

    >>> build_balancer(LossConfig(balancing="uncertainty"), torch.ones(2), ["a", "b"]).weights().tolist()
    [1.0, 1.0]
    """
    check_loss_config(cfg)
    if cfg.balancing == "uncertainty":
        return UncertaintyBalancer(loss_weights, task_names, cfg.uncertainty_lr)
    if cfg.balancing == "gradnorm":
        return GradNormBalancer(loss_weights, task_names, cfg.gradnorm_lr, cfg.gradnorm_alpha)
    return LossBalancer(loss_weights, task_names)
