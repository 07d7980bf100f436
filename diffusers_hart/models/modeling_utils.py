"""The base class of the HART models: diffusers' `ModelMixin` without its spurious float32 warning."""

import logging
from functools import wraps

from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import logging as diffusers_logging

# The logger `ModelMixin.to` warns on; named after ModelMixin's module, so that the filter follows it if it moves.
_modeling_logger = diffusers_logging.get_logger(ModelMixin.__module__)


class _DropMessagesStartingWith(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


class HARTModelMixin(ModelMixin):
    r"""
    [`~diffusers.ModelMixin`] whose `to(dtype)` stays quiet when nothing has to be kept in float32.

    diffusers 0.42 replaces `_keep_in_fp32_modules = None` by `[]` before testing it against `None`, so every dtype
    cast logs "There are modules in X that should be kept in float32: []" although there are none. A model without
    such modules drops exactly that message, for the duration of the call only; one that declares some still gets
    the warning, and every other message of the logger passes.
    """

    @wraps(ModelMixin.to)
    def to(self, *args, **kwargs):
        if self._keep_in_fp32_modules:
            return super().to(*args, **kwargs)
        spurious = _DropMessagesStartingWith(
            f"There are modules in {self.__class__.__name__} that should be kept in float32: []."
        )
        _modeling_logger.addFilter(spurious)
        try:
            return super().to(*args, **kwargs)
        finally:
            _modeling_logger.removeFilter(spurious)
