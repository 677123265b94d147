"""Every exception layerwise raises: one family, each member also the builtin a caller expects.

================================  ===========================  ==========================================
class                             also a                       raised for
================================  ===========================  ==========================================
:class:`LayerwiseError`           ``Exception``                the base: ``except lw.LayerwiseError``
:class:`SelectionError`           ``ValueError``               a malformed selector, or one matching nothing
:class:`OptionError`              ``ValueError``               an option with a bad value (names the option)
:class:`OptionTypeError`          ``TypeError``, ``ValueError``  an option of the wrong type
:class:`NotFoundError`            ``KeyError``                 a name looked up in a result that lacks it
:class:`CheckpointError`          ``ValueError``               a file that cannot be read or written as asked
:class:`CheckpointNotFoundError`  ``FileNotFoundError``        an input path that does not exist
:class:`OutputExistsError`        ``FileExistsError``          an output that exists (pass ``overwrite=True``)
:class:`MergeError`               ``ValueError``               models or options that cannot be merged
:class:`GradError`                ``ValueError``               a bad argument to a gradient tool
:class:`NonFiniteGradError`       ``FloatingPointError``       a gradient that holds NaN or inf
:class:`StateError`               ``RuntimeError``             an object used out of order, or a model
                                                               that changed under it
:class:`DistributedError`         ``RuntimeError``             ranks that disagree
:class:`MissingExtraError`        ``ImportError``              an optional dependency not installed
:class:`VerificationError`        ``AssertionError``           a check the demo runs on itself failed
================================  ===========================  ==========================================

The command line maps them to exit codes by type: a :class:`VerificationError` exits 1, any
other :class:`LayerwiseError` exits 2 (bad input).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "CheckpointError",
    "CheckpointNotFoundError",
    "DistributedError",
    "GradError",
    "LayerwiseError",
    "MergeError",
    "MissingExtraError",
    "NonFiniteGradError",
    "NotFoundError",
    "OptionError",
    "OptionTypeError",
    "OutputExistsError",
    "SelectionError",
    "StateError",
    "VerificationError",
]


class LayerwiseError(Exception):
    """Base class of every error layerwise raises.

    The concrete errors also subclass the built-in exception a caller would expect
    (``ValueError`` for a bad argument, ``FloatingPointError`` for a non-finite gradient),
    so ``except ValueError`` keeps working.

    Example:
        >>> import layerwise as lw, torch
        >>> try:
        ...     lw.select(torch.nn.Linear(2, 2), "wieght")
        ... except lw.LayerwiseError as e:
        ...     print(type(e).__name__)
        SelectionError
    """

    def __str__(self) -> str:
        # KeyError quotes its message (repr); every layerwise message is already a sentence.
        return str(self.args[0]) if len(self.args) == 1 else super().__str__()


class SelectionError(LayerwiseError, ValueError):
    """A selector that is malformed, or that matches nothing (unless ``missing_ok=True``).

    Example:
        >>> import layerwise as lw, torch
        >>> lw.select(torch.nn.LSTM(4, 4), "weight")
        Traceback (most recent call last):
        ...
        layerwise.errors.SelectionError: selector 'weight' matched no parameter of LSTM. Closest names: weight_ih_l0, weight_hh_l0...
    """


class OptionError(LayerwiseError, ValueError):
    """An option whose value is out of range; the message names the option and what it accepts.

    Example:
        >>> import layerwise as lw, torch
        >>> lw.EMA(torch.nn.Linear(2, 2), decay=1.5)
        Traceback (most recent call last):
        layerwise.errors.OptionError: EMA option decay=1.5 must be in [0, 1], e.g. 0.999 (the weight kept per update)
    """


class OptionTypeError(OptionError, TypeError):
    """An option of the wrong type (``every=1.5``, ``lr="fast"``); also a ``TypeError``.

    Example:
        >>> import layerwise as lw, torch
        >>> lw.EMA(torch.nn.Linear(2, 2), every=1.5)
        Traceback (most recent call last):
        layerwise.errors.OptionTypeError: EMA option every=1.5 must be an int >= 1 (a number of calls)
    """


class NotFoundError(LayerwiseError, KeyError):
    """A name looked up in a result (a :class:`Selection`, :class:`GradStats`) that lacks it.

    Example:
        >>> import layerwise as lw, torch
        >>> lw.select(torch.nn.Linear(2, 2), "**")["wieght"]
        Traceback (most recent call last):
        ...
        layerwise.errors.NotFoundError: 'wieght' is not in this selection; closest: weight
    """


class CheckpointError(LayerwiseError, ValueError):
    """A checkpoint that cannot be read or written as asked; the message names the file and key.

    Example:
        >>> import layerwise as lw, torch, tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "m.safetensors")
        >>> lw.save({"w": torch.ones(2)}, path, metadata={"epoch": 3})
        Traceback (most recent call last):
        ...
        layerwise.errors.CheckpointError: .../m.safetensors: safetensors metadata maps strings to strings; not 'epoch': int
    """


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """An input file or folder that does not exist.

    Example:
        >>> import layerwise as lw
        >>> lw.load("no-such-model.safetensors")
        Traceback (most recent call last):
        ...
        layerwise.errors.CheckpointNotFoundError: no-such-model.safetensors: no such file or folder
    """


class OutputExistsError(CheckpointError, FileExistsError):
    """An output path that already exists: pass ``overwrite=True`` (``--force``) to replace it.

    Example:
        >>> import layerwise as lw, torch, tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "m.safetensors")
        >>> _ = lw.save({"w": torch.ones(2)}, path)
        >>> lw.save({"w": torch.zeros(2)}, path)
        Traceback (most recent call last):
        ...
        layerwise.errors.OutputExistsError: .../m.safetensors: already exists; pass overwrite=True (--force) to replace it
    """


class MergeError(LayerwiseError, ValueError):
    """Models that cannot be merged (keys, shapes or dtypes differ) or a bad merge option.

    Example:
        >>> import layerwise as lw, torch
        >>> lw.average([torch.nn.Linear(2, 2), torch.nn.Linear(2, 3)])
        Traceback (most recent call last):
        ...
        layerwise.errors.MergeError: the models differ (2 differences): weight: shape (2, 2) in model 0 but (3, 2) in model 1; bias: ...
    """


class GradError(LayerwiseError, ValueError):
    """A bad argument to a gradient tool (statistics, monitor, sinks, surgery), raised at once,
    before anything changed: not at the first log step, not half-way through an assignment.

    Example:
        >>> import layerwise as lw, torch
        >>> lw.grad_stats(torch.nn.Linear(2, 2), stats=["nrom"])
        Traceback (most recent call last):
        ...
        layerwise.errors.GradError: unknown statistic 'nrom' (did you mean 'norm'?). Valid: norm, mean, std, max_abs, zero_frac.
        >>> lw.set_grad(torch.nn.Linear(2, 1), "bias", torch.zeros(2))
        Traceback (most recent call last):
        ...
        layerwise.errors.GradError: set_grad changed nothing: bias has shape (1,) but its value has shape (2,).
    """


class NonFiniteGradError(LayerwiseError, FloatingPointError):
    """A gradient holds NaN or inf. ``names`` lists the parameters concerned, the first culprit
    first; ``step`` is the :class:`GradMonitor` step, or None.

    Example:
        >>> import layerwise as lw, torch
        >>> net = torch.nn.Linear(2, 1)
        >>> with lw.watch_nonfinite(net):
        ...     net(torch.tensor([[float("inf"), 1.0]])).sum().backward()
        Traceback (most recent call last):
        ...
        layerwise.errors.NonFiniteGradError: the gradient of 'weight' holds NaN or inf...
    """

    def __init__(self, message: str, names: Sequence[str] = (), step: int | None = None):
        super().__init__(message)
        self.names, self.step = list(names), step


class StateError(LayerwiseError, RuntimeError):
    """An object used out of order, or a model that changed under an object that tracks it
    (an :class:`EMA` after ``model.to(torch.float16)``); the message says what changed.

    Example:
        >>> import layerwise as lw, torch
        >>> net = torch.nn.Linear(2, 2)
        >>> ema = lw.EMA(net)
        >>> _ = net.half()
        >>> ema.update()  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        layerwise.errors.StateError: the model changed under this EMA: weight was torch.float32 (2, 2) on cpu, is now torch.float16 ...
    """


class DistributedError(LayerwiseError, RuntimeError):
    """Ranks that disagree (on the parameters to average, say); raised alike on every rank.

    Example:
        >>> import layerwise as lw
        >>> issubclass(lw.DistributedError, RuntimeError)
        True
    """


class MissingExtraError(LayerwiseError, ImportError):
    """An optional dependency that is not installed; the message names the pip extra.

    Example:
        >>> import layerwise as lw
        >>> str(lw.MissingExtraError("plotting needs matplotlib: pip install 'layerwise[plot]'"))
        "plotting needs matplotlib: pip install 'layerwise[plot]'"
    """


class VerificationError(LayerwiseError, AssertionError):
    """A check that layerwise runs on its own results (the demo's verifications) failed.

    Example:
        >>> import layerwise as lw
        >>> issubclass(lw.VerificationError, AssertionError)
        True
    """
