"""The onnxruntime backend: time the graph that would be deployed, as onnxruntime runs it.

``prepare`` writes the model as it would be saved (:func:`graphprune.formats.model_io.to_onnx`: lowered or
exported, then simplified; not re-verified, which only costs time here), builds one
``InferenceSession`` and returns a callable that runs it on one fixed random batch. The feeds are
made once, so a run times the session and nothing else.

Session settings, and why:

* ``ORT_ENABLE_ALL`` graph optimisations: what a deployment uses; the fusions change what a block
  costs, so they must be on when deciding which blocks to drop.
* ``intra_op_num_threads = settings.threads``, ``inter_op_num_threads = 1``, sequential execution:
  the thread count the user asked for and no more. With one thread onnxruntime creates no worker
  thread at all (the calling thread computes; checked by counting the process's threads and by
  CPU time equal to wall time), so spinning cannot matter there.
* Intra-op spinning stays on (onnxruntime's default). Turning it off (``allow_spinning = 0``) was
  measured: no effect at one thread, and at two threads on a 2-core machine ResNet-56 went from
  1.4 ms to 2.55 ms (workers sleep and must be woken for every op), which is not what a deployed
  session shows.
* On CUDA, ``session.run`` takes and returns host arrays, so each run includes copying the input
  to the device and the output back (what a caller of ``session.run`` sees); it returns only when
  the outputs are on the host, so wall-clock timing is correct without an explicit synchronise.
"""

from __future__ import annotations

from ..errors import GraphpruneError, first_line
from ..formats.input_layout import is_channels_last
from ..formats.ort_run import ort_feeds
from ..model import Model
from ..formats.model_io import to_onnx
from .base import LatencySettings, RunOnce
from .environment import batch_inputs, check_settings, describe_common, library_versions, spec_batch_inputs

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


class OnnxRuntimeBackend:
    """Time models with onnxruntime on the CPU or, with onnxruntime-gpu, on CUDA."""

    name = "onnxruntime"

    def prepare(self, model: Model, settings: LatencySettings) -> RunOnce:
        check_settings(settings)
        return session_runner(to_onnx(model, verify=False), batch_inputs(model, settings), settings,
                              is_channels_last(model))

    @staticmethod
    def provider(settings: LatencySettings) -> str:
        """The execution provider for ``settings.device``; an error if this onnxruntime lacks it."""
        import onnxruntime as ort

        check_settings(settings)
        wanted = PROVIDERS[settings.device]
        available = ort.get_available_providers()
        if wanted not in available:
            raise GraphpruneError(
                f"device '{settings.device}' needs onnxruntime's {wanted}, which this onnxruntime "
                f"{ort.__version__} does not have (available: {', '.join(available)}); install onnxruntime-gpu "
                "or use --device cpu"
            )
        return wanted

    @staticmethod
    def session_options(settings: LatencySettings):
        """Session options for one measurement (see the module docstring for each choice)."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.intra_op_num_threads = settings.threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 4  # a failing run is raised and said in one line; no log of it
        return options

    def describe(self, settings: LatencySettings) -> dict:
        import onnxruntime as ort

        info = describe_common(self.name, settings)
        info["providers"] = [PROVIDERS.get(settings.device, settings.device)]
        info["graph_optimization_level"] = "ORT_ENABLE_ALL"
        # ort.__version__, not package metadata: the distribution may be onnxruntime-gpu.
        info["versions"] = {"onnxruntime": ort.__version__, **library_versions("onnx", "torch")}
        return info


def file_runner(proto, settings: LatencySettings, input_shape: tuple[int, ...] | None = None,
                what: str = "the model") -> RunOnce:
    """:func:`session_runner` for an ONNX file as it is, not read into graphprune (an int8 file, whose
    quantised ops its converter lacks): one random batch of the file's own input shape and layout
    (``input_shape``, or the file's recorded image size, where its spatial size is dynamic)."""
    from ..formats.input_shape import resolve_input_shape
    from ..formats.io_onnx import input_specs

    check_settings(settings)
    specs = input_specs(proto)
    shape, _ = resolve_input_shape(proto, specs, input_shape)
    return session_runner(proto, spec_batch_inputs(specs, shape, settings), settings, what=what)


def session_runner(proto, inputs, settings: LatencySettings, channels_last: bool = False,
                   what: str = "the model") -> RunOnce:
    """A callable that runs ``proto`` once on ``inputs`` (fed in the file's layout) in one
    :class:`OnnxRuntimeBackend` session; it has run once already, so a model onnxruntime cannot
    load or run fails here, in one line, rather than inside a timing loop."""
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(proto.SerializeToString(), OnnxRuntimeBackend.session_options(settings),
                                       providers=[OnnxRuntimeBackend.provider(settings)])
    except GraphpruneError:
        raise
    except Exception as exc:
        raise GraphpruneError(f"onnxruntime cannot load {what}: {first_line(exc)}") from None
    feeds = ort_feeds(session, inputs, channels_last)

    def run_once() -> None:
        session.run(None, feeds)

    try:
        run_once()
    except Exception as exc:
        raise GraphpruneError(f"onnxruntime cannot run {what} at batch {settings.batch_size}: "
                              f"{first_line(exc)}") from None
    return run_once
