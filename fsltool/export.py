"""Export a trained method to ONNX and TorchScript, with its preprocessing contract, and verify the ONNX
graphs under ONNX Runtime against PyTorch on stored test episodes."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from fsltool import __version__
from fsltool.atomic import atomic_write
from fsltool.calibration import carried_calibration
from fsltool.checkpoint import TrainedModel, load_trained
from fsltool.data.episodes import Episode, EpisodeShape, episode_labels
from fsltool.data.store import FewShotData
from fsltool.errors import FsltoolError
from fsltool.folder_lock import FolderLock
from fsltool.methods.base import ExportGraph
from fsltool.runtime import OnnxModel, create_session


@dataclass
class Verification:
    episodes: int
    shape: str
    max_abs_diff: float
    agreement: float  # fraction of queries with the same predicted class
    provider: str
    accuracy: float  # % of queries the ONNX graph classifies right (the deployed model's accuracy)


@dataclass
class ExportReport:
    out_dir: Path
    files: list[Path] = field(default_factory=list)
    verification: Verification | None = None


def preprocessing_contract(trained: TrainedModel) -> dict[str, Any]:
    """What another runtime must do to an image before it enters the graphs."""
    channels, height, width = trained.config["image_shape"]
    return {
        "fsltool_version": __version__,
        "method": trained.config["method"],
        "backbone": trained.config["backbone"],
        "input_channels": channels,
        "input_height": height,
        "input_width": width,
        "input_layout": "NCHW float32",
        "pixel_scale": "uint8 / 255 -> [0, 1]",
        "color": "grey (L)" if channels == 1 else "RGB",
        "resize": "LANCZOS to input_height x input_width",
        "invert": bool(trained.config.get("preprocessing", {}).get("invert", False)),
        "normalization": {"mean": trained.config["mean"], "std": trained.config["std"], "applied": "inside the graph"},
    }


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """torch's exporters print progress lines and deprecation warnings, and onnxscript's optimizer logs what it
    cannot fold (an enrolled SNAIL's constant support sequence: "Skipping constant folding for op Split"); a CLI
    command should not."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _check_other_sizes(model: onnx.ModelProto, graph: ExportGraph, check: ExportGraph, path: Path) -> None:
    """Run the graph at sizes other than the traced example's: an exporter that silently fixed a "dynamic"
    dimension to the example's value is caught here, before a wrong file is written."""
    session = create_session(model.SerializeToString(), "cpu")
    inputs = {name: tensor.numpy() for name, tensor in zip(graph.input_names, check.example_inputs)}
    with torch.inference_mode():
        expected = check.module(*check.example_inputs).numpy()
    try:
        got = session.run(None, inputs)[0]
    except Exception as error:  # ORT's own exception types
        raise FsltoolError(f"{path.name}: the exported graph does not run at other sizes ({str(error).splitlines()[0][:200]})") from None
    if got.shape != expected.shape or not np.allclose(got, expected, rtol=1e-3, atol=1e-3):
        raise FsltoolError(f"{path.name}: the exported graph gives wrong results at other sizes; not written")


def export_onnx(graph: ExportGraph, check: ExportGraph, path: Path, metadata: dict[str, Any]) -> None:
    """ONNX with ``metadata`` in the model, run under ONNX Runtime at ``check``'s other sizes before ``path`` is
    written (atomically): a graph that fails there is never written. Also used by fsltool.enroll."""
    dims: dict[str, torch.export.Dim] = {}
    dynamic_shapes = {
        name: {axis: dims.setdefault(label, torch.export.Dim(label)) for axis, label in axes.items()}
        for name, axes in graph.dynamic_axes.items()
    }
    for name in graph.input_names:
        dynamic_shapes.setdefault(name, {})
    try:
        with _quiet_exporter():
            program = torch.onnx.export(
                graph.module, graph.example_inputs, dynamo=True, external_data=False, verbose=False,
                input_names=graph.input_names, output_names=graph.output_names, dynamic_shapes=dynamic_shapes,
            )
    except Exception as error:  # the exporter raises many types; the user needs the first line and the graph name
        raise FsltoolError(f"{path.name}: ONNX export failed ({str(error).splitlines()[0]})") from None
    model = program.model_proto
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)
    onnx.checker.check_model(model)
    _check_other_sizes(model, graph, check, path)
    atomic_write(path, lambda file: file.write(model.SerializeToString()))


def export_torchscript(graph: ExportGraph, path: Path, metadata: dict[str, Any]) -> None:
    """A traced TorchScript module with ``metadata`` as its extra file ``fsltool.json``, written atomically."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(graph.module, graph.example_inputs)
        extra = {"fsltool.json": json.dumps(metadata)}
        atomic_write(path, lambda file: torch.jit.save(traced, file, _extra_files=extra))


def onnx_inference_copy(network: nn.Module, example: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """``network`` (eval mode) under ONNX Runtime on ``example``'s device, for evaluation (``--runtime onnx``):
    images -> outputs, torch tensors on that device.

    Exported in memory by torch's TorchScript-based exporter, traced on two images: 0.3-0.7 s for Conv-4, where the
    torch.export-based exporter of `fsltool export` takes 3-14 s on 2 cores, more than the whole evaluation it
    would speed up. Before use the copy is run on 16 images of ``example`` (another batch size than the trace's) and
    compared with ``network``: a graph that fixed the batch size or computes something else is refused."""
    if torch.is_autocast_enabled(example.device.type):
        raise FsltoolError("--runtime onnx runs the float32 graph, but this run evaluates at its recipe's precision "
                           "bf16: use --runtime torch")
    buffer = io.BytesIO()
    with _quiet_exporter():
        torch.onnx.export(network, (example[:2],), buffer, dynamo=False, input_names=["images"], output_names=["outputs"],
                          dynamic_axes={"images": {0: "batch"}})
    model = OnnxModel(buffer.getvalue(), str(example.device), spinning=False)  # PyTorch scores between the calls
    if example.is_cuda and model.device != "cuda":
        raise FsltoolError(f"--runtime onnx: ONNX Runtime cannot run on {example.device} here (it offers {model.provider} "
                           "alone): use --device cpu or --runtime torch")

    def run(images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(model.run({"images": images.cpu().numpy()})[0]).to(images.device)

    check = example[:16]
    got, expected = run(check), network(check)
    if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-3, atol=1e-3):
        raise FsltoolError("--runtime onnx: the ONNX graph of the embedding network does not reproduce PyTorch's "
                           "embeddings: use --runtime torch")
    return run


def _example_episode(image_shape: list[int], shape: EpisodeShape) -> Episode:
    """An episode of random pixels: only its shapes matter, to trace (and then check) the graphs."""
    support_labels, query_labels = episode_labels(shape)
    generator = torch.Generator().manual_seed(0)
    return Episode(torch.rand(len(support_labels), *image_shape, generator=generator), support_labels,
                   torch.rand(len(query_labels), *image_shape, generator=generator), query_labels, shape)


def export_run(
    run: str | Path,
    out_dir: str | Path | None = None,
    *,
    which: str = "best",
    data_path: str | None = None,
    verify_episodes: int = 100,
    device: str = "auto",
) -> ExportReport:
    """Write ``<name>.onnx``, ``<name>.ts`` and ``model.json`` for each graph the method exports."""
    trained = load_trained(run, which)
    out = Path(out_dir) if out_dir is not None else trained.path.parent.parent / "export"
    with FolderLock(out, "export folder"):  # two exports into one folder would mix their files
        return _export_into(trained, out, data_path, verify_episodes, device)


def _export_into(trained: TrainedModel, out: Path, data_path: str | None, verify_episodes: int, device: str) -> ExportReport:
    contract = {**preprocessing_contract(trained), **carried_calibration(trained)}
    image_shape = trained.config["image_shape"]
    graphs = trained.method.export_graphs(_example_episode(image_shape, EpisodeShape(3, 2, 2)))
    checks = trained.method.export_graphs(_example_episode(image_shape, EpisodeShape(6, 3, 1)))
    report = ExportReport(out)
    for name, graph in graphs.items():
        metadata = {**contract, "graph": name, "inputs": graph.input_names, "outputs": graph.output_names}
        onnx_path, ts_path = out / f"{name}.onnx", out / f"{name}.ts"
        export_onnx(graph, checks[name], onnx_path, metadata)
        export_torchscript(graph, ts_path, metadata)
        report.files += [onnx_path, ts_path]
    sidecar = out / "model.json"
    graph_io = {name: {"inputs": g.input_names, "outputs": g.output_names, "dynamic_axes": g.dynamic_axes} for name, g in graphs.items()}
    atomic_write(sidecar, lambda file: file.write(json.dumps({**contract, "graphs": graph_io}, indent=2).encode()))
    report.files.append(sidecar)
    if verify_episodes > 0 and "classifier" in graphs:
        report.verification = verify(trained, out / "classifier.onnx", data_path or trained.recipe.data, verify_episodes, device)
    return report


def verify(trained: TrainedModel, onnx_path: Path, data_path: str, episodes: int, device: str = "auto") -> Verification:
    """Run the exported classifier under ONNX Runtime and the PyTorch method on the same stored test episodes."""
    shape = EpisodeShape.parse(trained.recipe.test_shape)
    model = OnnxModel(str(onnx_path), device)
    # Methods that adapt at test time export a fixed graph that is not their fine-tuned forward (MAML, Reptile:
    # the body as a prototype classifier): they name the PyTorch module the graph stands for.
    reference = getattr(trained.method, "exported_classifier", lambda: trained.method)().eval()
    max_diff, agree, correct, total = 0.0, 0, 0, 0
    with FewShotData(data_path) as data:
        support_idx, query_idx = data.stored_episodes("test", shape)
        count = min(episodes, len(support_idx))
        for s, q in zip(support_idx[:count], query_idx[:count]):
            episode = data.episode(s, q, shape)
            with torch.inference_mode():
                expected = reference(episode.support, episode.support_labels, episode.query).numpy()
            got = model.run({"support": episode.support.numpy(), "support_labels": episode.support_labels.numpy(),
                             "query": episode.query.numpy()})[0]
            max_diff = max(max_diff, float(np.abs(got - expected).max()))
            agree += int((got.argmax(-1) == expected.argmax(-1)).sum())
            correct += int((got.argmax(-1) == episode.query_labels.numpy()).sum())
            total += len(got)
    return Verification(count, str(shape), max_diff, agree / total, model.provider, 100 * correct / total)
