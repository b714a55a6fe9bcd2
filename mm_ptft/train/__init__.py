"""Training: the Trainer loop, optimizer parameter groups and schedules, metrics logging."""

from mm_ptft.train.optim import create_optimizer, create_scheduler, lr_lambda, param_groups

__all__ = ["Trainer", "create_optimizer", "create_scheduler", "lr_lambda", "param_groups"]


def __getattr__(name: str):
    # the Trainer pulls in data, eval and tasks; import it only when asked for
    if name == "Trainer":
        from mm_ptft.train.trainer import Trainer

        return Trainer
    raise AttributeError(name)
