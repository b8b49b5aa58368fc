"""Knowledge-distillation fine-tuning: the compressed student learns the teacher's logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slimsearch.spaces.plan import DistillPlan
from slimsearch.tasks import Split


def teacher_logits(teacher: nn.Module, data: Split, batch_size: int = 512) -> torch.Tensor:
    """The teacher's logits on every example of ``data`` (computed once per candidate)."""
    teacher.eval()
    with torch.no_grad():
        return torch.cat([teacher(data.x[i : i + batch_size]) for i in range(0, len(data), batch_size)])


def distill(student: nn.Module, targets: torch.Tensor, data: Split, plan: DistillPlan, *, seed: int) -> nn.Module:
    """Fine-tune ``student`` for ``plan.steps`` steps on soft targets plus labels.

    Loss: ``alpha * T^2 * KL(student/T || teacher/T) + (1 - alpha) * CE(labels)``,
    Adam with a cosine learning-rate decay. Batches are drawn from a generator
    seeded with ``seed``, so the same plan gives the same student.
    """
    if plan.steps <= 0:
        return student.eval()
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    opt = torch.optim.Adam(student.parameters(), lr=plan.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=plan.steps)
    temp = plan.temperature
    student.train()
    for _ in range(plan.steps):
        idx = torch.randint(0, len(data), (plan.batch_size,), generator=gen)
        logits = student(data.x[idx])
        soft = F.kl_div(
            F.log_softmax(logits / temp, dim=1), F.log_softmax(targets[idx] / temp, dim=1),
            reduction="batchmean", log_target=True,
        )
        loss = plan.alpha * temp * temp * soft + (1 - plan.alpha) * F.cross_entropy(logits, data.y[idx])
        if not torch.isfinite(loss):
            raise FloatingPointError(f"distillation loss became {loss.item()} ; the candidate diverged")
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return student.eval()
