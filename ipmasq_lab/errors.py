"""The lab harness's exceptions: one base class, one for refused specs."""


class LabError(RuntimeError):
    """A lab operation that cannot be done (unknown lab or host, prefix in use, ...)."""


class LabSpecError(LabError, ValueError):
    """A spec entry the lab refuses; `path` names the entry, `value` is what it held."""

    def __init__(self, path, value, message):
        self.path = path
        self.value = value
        self.message = message
        super().__init__("%s: %s" % (path, message) if path else message)
