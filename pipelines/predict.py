"""Predict: run the base models on the degraded inputs of a folder, straight into a store.

`SOURCE/lq` holds the degraded images (and `SOURCE/gt` the ground truth, when there is one). One
task per image decodes its input, runs every model on it (on the worker's device, each model
loaded once per worker: `ensir_flow.models.loaded_model`) and returns the outputs as uint8, as a
PNG writer would store them, with the ground truth and the input. From there on the store is
written exactly as `ingest` writes one (`ingest.PixelBlocks`, `ingest.pixel_store`,
`ingest.store_writer`: staged, chunk-aligned, resumable after a kill), so `fit`, `apply` and
`evaluate` take it unchanged, and a store predicted here holds the bytes that ingesting the same
outputs saved as PNGs would give (tested). Provenance: the input and ground-truth files' SHA-256s
as ingest records them, each model file's SHA-256 (`model_files`) and the inference options.
"""

from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

import ensir_flow
from ensir_flow import schema
from ensir_flow.devices import resolve_device
from ensir_flow.errors import InputError
from ensir_flow.images import (
    GROUND_TRUTH_DIR,
    INPUT_DIR,
    Corpus,
    ImageInfo,
    check_model_names,
    images_by_stem,
    probe_image,
    read_image,
)
from ensir_flow.models import Inference, ModelFile, loaded_model, predict_image, sample_seed

from .commit import exists, refuse_existing
from .ingest import (
    WRITE_KEYS,
    PixelBlocks,
    append_plan,
    holds,
    pixel_store,
    refuse_changed_sources,
    source_provenance,
    storable_inputs,
    store_writer,
)
from .plan import Plan
from .stores import open_store

#: Attributes of a predicted store that say what it was predicted from and how, besides `WRITE_KEYS`.
PREDICT_KEYS = ("model_files", "inference")


def member_names(models: list[ModelFile], samples: int) -> list[str]:
    """The ensemble's members: each model's name, or NAME#0 ... NAME#N-1 with N samples per image."""
    return [model.name if samples == 1 else f"{model.name}#{i}" for model in models for i in range(samples)]


def discover_inputs(source) -> Corpus:
    """The degraded inputs of `source/lq` and the ground truth of `source/gt` (if any), paired by stem."""
    root = Path(source)
    if not root.is_dir():
        raise InputError(f"{root}: source folder not found")
    inputs = images_by_stem(root / INPUT_DIR)
    truth = images_by_stem(root / GROUND_TRUTH_DIR) if (root / GROUND_TRUTH_DIR).is_dir() else None
    stems = sorted(inputs)
    if truth is not None and sorted(truth) != stems:
        missing, extra = sorted(set(stems) - set(truth)), sorted(set(truth) - set(stems))
        raise InputError(
            f"{root / GROUND_TRUTH_DIR}: "
            + (
                f"missing {len(missing)} image(s) present in lq/: {', '.join(missing[:5])}"
                if missing
                else f"{len(extra)} image(s) absent from lq/: {', '.join(extra[:5])}"
            )
        )
    return Corpus(root, [], stems, {}, [truth[s] for s in stems] if truth is not None else None, [inputs[s] for s in stems])


def _probe(corpus: Corpus, scale: int) -> tuple[list[ImageInfo], list[ImageInfo]]:
    """Each input's shape and the shape its outputs must have (`scale` times larger), after checking
    that the ground truth has the outputs' shape and that the corpus does not mix gray and colour."""
    with ThreadPoolExecutor(max_workers=8) as pool:
        inputs = list(pool.map(probe_image, corpus.inputs))
        truths = list(pool.map(probe_image, corpus.ground_truth)) if corpus.ground_truth is not None else None
    if len({info.channels for info in inputs}) > 1:
        gray = next(corpus.stems[i] for i, info in enumerate(inputs) if info.channels == 1)
        raise InputError(f"{corpus.root}: lq/ mixes grayscale (e.g. '{gray}') and colour images; convert them to one kind first")
    outputs = [ImageInfo(info.height * scale, info.width * scale, info.channels) for info in inputs]
    for i, truth in enumerate(truths or []):
        if truth != outputs[i]:
            raise InputError(
                f"{corpus.ground_truth[i]}: {truth.height}x{truth.width}x{truth.channels} differs from the outputs' "
                f"{outputs[i].height}x{outputs[i].width}x{outputs[i].channels} (lq/ x --scale {scale})"
            )
    return inputs, outputs


def _predict_planes(
    models: list[ModelFile],
    samples: int,
    how: Inference,
    input_path,
    input_info: ImageInfo,
    truth_path,
    output_info: ImageInfo,
    stem: str,
    keep_input: bool,
) -> tuple[np.ndarray, None]:
    """One task: the planes (members, then ground truth and input if kept; H*W*s^2, C) of one image,
    as a block of `ingest.PixelBlocks` (whose sources the plan hashed). `how.device` is resolved
    here, on the worker ('auto': its GPU if it has one)."""
    how = replace(how, device=resolve_device(how.device))
    image = read_image(input_path, input_info)
    planes = []
    for model in models:
        module = loaded_model(model, how.device)
        for sample in range(samples):
            label = f"model '{model.name}'" + (f" sample {sample}" if samples > 1 else "") + f" on {input_path}"
            planes.append(predict_image(module, image, how, sample_seed(stem, sample), label).reshape(-1, output_info.channels))
    if truth_path is not None:
        planes.append(read_image(truth_path, output_info).reshape(-1, output_info.channels))
    if keep_input:
        planes.append(image.reshape(-1, output_info.channels))
    return np.stack(planes), None


def _image_blocks(
    corpus: Corpus,
    models: list[ModelFile],
    samples: int,
    how: Inference,
    inputs: list[ImageInfo],
    outputs: list[ImageInfo],
    keep_input: bool,
) -> PixelBlocks:
    """The planes (members, then ground truth and input if kept) in one block per image, each
    computed by one prediction task: a model's work on an image, not its bytes, sizes a task."""
    n_roles = len(models) * samples + (corpus.ground_truth is not None) + keep_input
    tasks = [
        (
            _predict_planes,
            models,
            samples,
            how,
            corpus.inputs[i],
            inputs[i],
            corpus.ground_truth[i] if corpus.ground_truth else None,
            outputs[i],
            stem,
            keep_input,
        )
        for i, stem in enumerate(corpus.stems)
    ]
    counts = np.array([info.height * info.width for info in outputs], dtype=np.int64)
    return PixelBlocks.of_tasks("predict", tasks, np.arange(len(tasks)), counts, n_roles, outputs[0].channels)


def _extra_names(corpus: Corpus, keep_input: bool) -> list[str]:
    return [name for name, kept in ((schema.GROUND_TRUTH, corpus.ground_truth is not None), (schema.INPUT, keep_input)) if kept]


def _provenance(models: list[ModelFile], samples: int, how: Inference) -> dict:
    """The attributes recording each model file and the inference options."""
    return {
        "model_files": {model.name: {"file": model.path, "sha256": model.sha256} for model in models},
        "inference": {**asdict(how), "samples": samples},
    }


def plan_predict(
    source,
    store: str,
    models: list[ModelFile],
    how: Inference = Inference(),
    samples: int = 1,
    chunk_pixels: int = schema.DEFAULT_CHUNK_PIXELS,
    compression: str = schema.DEFAULT_COMPRESSION,
    overwrite: bool = False,
) -> Plan:
    """Plan running every model of `models` (`samples` times each, seeded by image and sample) on
    the inputs of `source/lq` into the new store `store`, as `ingest` would write the outputs.

    Without `overwrite`, a store that already holds exactly this prediction (same inputs, model files
    and options) is left as it is ('unchanged'); any other existing store is refused. A run killed
    half-way is resumed by the same command ('resumed')."""
    if samples < 1:
        raise InputError(f"--samples {samples}: must be at least 1")
    corpus = discover_inputs(source)
    inputs, outputs = _probe(corpus, how.scale)
    stored, input_note = storable_inputs(corpus, outputs)
    keep_input = stored.inputs is not None
    index = schema.ImageIndex(corpus.stems, np.array([i.height for i in outputs]), np.array([i.width for i in outputs]))
    blocks = _image_blocks(corpus, models, samples, how, inputs, outputs, keep_input)
    lengths = blocks.chunk_lengths(chunk_pixels)
    check_model_names([model.name for model in models], source)
    members, channels = member_names(models, samples), outputs[0].channels
    attrs = schema.store_attributes(
        members,
        channels,
        created_by=f"ensir-flow {ensir_flow.__version__} predict",
        source=str(source),
        chunk_pixels=int(chunk_pixels),
        compression=compression,
        **input_note,
        **_provenance(models, samples, how),
    )
    extra_names = _extra_names(corpus, keep_input)
    ds, encoding = pixel_store(
        index, members, blocks.planes(lengths), extra_names, chunk_pixels, compression, attrs, source_provenance(corpus)
    )
    unchanged = not overwrite and exists(store) and holds(store, ds, WRITE_KEYS + PREDICT_KEYS)
    if not unchanged:
        refuse_existing(store, overwrite)
    details = _details(source, store, models, samples, how, corpus, index, channels)
    details.update(
        {
            "inputs (lq/)": "stored" if keep_input else input_note["input"],
            "tasks": f"{len(corpus.stems)} predictions (one per image, every model), {len(lengths)} to assemble and "
            f"write the chunks of {chunk_pixels:,} pixels",
            "compression": compression,
        }
    )
    execute, stages = store_writer(
        store, ds, encoding, blocks, extra_names, overwrite, unchanged, "predict", "run the models on each image"
    )
    return Plan(f"predict {len(corpus.stems)} images with {len(models)} model(s)", details, execute, stages=stages)


def _details(source, store, models: list[ModelFile], samples: int, how: Inference, corpus: Corpus, index, channels) -> dict:
    """What a dry run shows of a prediction."""
    return {
        "source": str(source),
        "store": str(store),
        "models": ", ".join(f"{m.name} ({m.path}, sha256 {m.sha256[:12]})" for m in models),
        "samples per image": samples,
        "device": how.device,
        "value range": how.value_range,
        "scale": how.scale,
        "tiles": "whole images" if how.tile is None else f"{how.tile} px, overlap {how.overlap}, {how.batch} per call",
        "ground truth": "yes" if corpus.ground_truth is not None else "no",
        "images": len(corpus.stems),
        "pixels": f"{index.n_pixels:,} x {channels} channels",
    }


def plan_predict_append(source, store: str, models: list[ModelFile], how: Inference = Inference(), samples: int = 1) -> Plan:
    """Plan predicting the inputs of `source/lq` whose stems `store` lacks, with the model files and
    options the store was predicted with (refused otherwise), appended as `ingest --append` appends
    (`resumable.committed_append`: every reader sees the store as before or as after). A store that
    does not exist yet is created by a plain `plan_predict`."""
    if not exists(store):
        first = plan_predict(source, store, models, how, samples)
        return Plan(
            f"append to a new store: {first.title}",
            first.details,
            lambda compute: first.run(compute).dataset.sizes["image"],
            stages=first.stages,
        )
    existing = open_store(store)
    schema.check_store(existing, store)
    recorded = _provenance(models, samples, how)
    for key, value in recorded.items():
        if existing.attrs.get(key) != value:
            raise InputError(
                f"{store}: predicted with other {'model files' if key == 'model_files' else 'options'} "
                f"({existing.attrs.get(key)}); --append runs the same models the same way: "
                "predict into a new store, or pass the store's models and options"
            )
    corpus = discover_inputs(source)
    has_truth = schema.GROUND_TRUTH in existing
    if (corpus.ground_truth is not None) != has_truth:
        raise InputError(
            f"{source}: {'has' if corpus.ground_truth is not None else 'lacks'} gt/ but the store "
            f"{'has' if has_truth else 'has no'} ground truth"
        )
    refuse_changed_sources(corpus, existing, store)
    known = {str(stem) for stem in existing["image"].values}
    keep = [i for i, stem in enumerate(corpus.stems) if stem not in known]
    details = {
        "source": str(source),
        "store": str(store),
        "new images": len(keep),
        "already in the store (skipped)": len(corpus.stems) - len(keep),
    }
    if not keep:
        return Plan("predict --append: nothing new", details, lambda compute: 0)
    pick = lambda files: None if files is None else [files[i] for i in keep]  # noqa: E731
    corpus = Corpus(corpus.root, [], pick(corpus.stems), {}, pick(corpus.ground_truth), pick(corpus.inputs))
    inputs, outputs = _probe(corpus, how.scale)
    if outputs[0].channels != existing.sizes["channel"]:
        raise InputError(f"{source}: images have {outputs[0].channels} channel(s), the store {existing.sizes['channel']}")
    keep_input = schema.INPUT in existing
    if keep_input and storable_inputs(corpus, outputs)[0].inputs is None:
        raise InputError(f"{source}: the store holds inputs, so lq/ must hold every new image at its outputs' size")
    index = schema.ImageIndex(corpus.stems, np.array([i.height for i in outputs]), np.array([i.width for i in outputs]))
    return append_plan(
        f"predict {len(keep)} new images into {store}",
        source,
        store,
        existing,
        corpus,
        index,
        _image_blocks(corpus, models, samples, how, inputs, outputs, keep_input),
        _extra_names(corpus, keep_input),
        details,
        "predict --append",
        "run the models on each new image",
    )
