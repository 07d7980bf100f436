from .scheduling_hart_residual import HARTResidualDiffusionScheduler, HARTResidualDiffusionSchedulerOutput


__all__ = ["HARTResidualDiffusionScheduler", "HARTResidualDiffusionSchedulerOutput"]
