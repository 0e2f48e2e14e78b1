"""The quick-start job: the whole workflow on a demo corpus built from scikit-image's sample photos.

From degraded inputs and model files, as a user starts: the three restorers are saved as
`torch.export` programs and run by `predict`. Half the images are the reference set (fit), the
other half are held out (apply, evaluate), so the figures it prints are out-of-sample, as a user's
would be.
"""

import json
import shutil
from pathlib import Path

import ensir_flow
from ensir_flow.binning import DEFAULT_BIN_WIDTH
from ensir_flow.demo_corpus import build_demo_corpus, save_demo_models
from ensir_flow.images import GROUND_TRUTH_DIR, INPUT_DIR
from ensir_flow.models import model_file

from . import targets
from .apply import plan_apply
from .commit import refuse_existing
from .evaluate import plan_cross_validation, plan_evaluate
from .fit import plan_fit
from .plan import Plan
from .predict import plan_predict
from .targets import DEMO_ENTRIES


def _split(corpus: Path, destination: Path, parity: int) -> None:
    """Copy every other stem (by sorted order, starting at `parity`) of gt/ and lq/ into `destination`."""
    stems = sorted(p.stem for p in (corpus / GROUND_TRUTH_DIR).iterdir())[parity::2]
    for folder in (GROUND_TRUTH_DIR, INPUT_DIR):
        (destination / folder).mkdir(parents=True)
        for path in sorted((corpus / folder).iterdir()):
            if path.stem in stems:
                shutil.copy2(path, destination / folder / path.name)


def plan_demo(directory, overwrite: bool = False) -> Plan:
    """Plan the demo run in `directory` (created; replaced with --overwrite). A folder that already
    holds the demo this version makes (`is_finished_demo`: e.g. the demo run again) is left as it
    is: its plan scores the stores there again for the summary, with status 'unchanged'."""
    root = Path(directory)
    paths = {name: root / name for name in DEMO_ENTRIES}
    details = {
        "directory": str(root),
        "corpus": "scikit-image sample photos, blurred + noise, 3 classical restorers (torch.export programs)",
        "steps": f"predict reference + held-out halves, fit (em, bin width {DEFAULT_BIN_WIDTH}), apply + export, evaluate; "
        "then 3-fold cross-validation of em and lsq on all images",
    }
    if not overwrite and is_finished_demo(root):
        return Plan(
            f"demo: {root} already holds this demo", details, lambda compute: _summary(paths, compute), status="unchanged"
        )
    refuse_existing(str(root), overwrite)

    def execute(compute):
        if root.exists():
            shutil.rmtree(root)
        root.mkdir(parents=True)
        paths[targets.DEMO_MARK].write_text(targets.demo_mark())  # first: a folder killed now is still the demo's
        build_demo_corpus(paths["corpus"])
        models = [model_file(name, path) for name, path in save_demo_models(paths["models"]).items()]
        _split(paths["corpus"], paths["reference"], 0)
        _split(paths["corpus"], paths["heldout"], 1)
        plan_predict(paths["reference"], str(paths["reference.zarr"]), models).run(compute)
        plan_predict(paths["heldout"], str(paths["heldout.zarr"]), models).run(compute)
        plan_fit(str(paths["reference.zarr"]), str(paths["lut.zarr"]), DEFAULT_BIN_WIDTH).run(compute)
        plan_apply(
            str(paths["heldout.zarr"]), str(paths["lut.zarr"]), str(paths["ensemble.zarr"]), str(paths["ensemble-png"])
        ).run(compute)
        plan_predict(paths["corpus"], str(paths["corpus.zarr"]), models).run(compute)
        return _summary(paths, compute)

    return Plan("demo: the whole workflow on an embedded corpus", details, execute)


def _summary(paths: dict[str, Path], compute) -> str:
    """What the demo prints: the held-out scores of its ensemble, then the cross-validation of em
    and lsq on all its images (read from its stores, which scoring leaves as they are)."""
    evaluation = plan_evaluate(str(paths["heldout.zarr"]), str(paths["ensemble.zarr"])).run(compute)
    comparison = plan_cross_validation(str(paths["corpus.zarr"]), 3, ["em", "lsq"], [DEFAULT_BIN_WIDTH]).run(compute)
    return (
        f"EnsIR (em) LUT fitted on {paths['reference']}, applied to the held-out images of {paths['heldout']}:\n"
        f"{evaluation.table()}\nensembled PNGs: {paths['ensemble-png']}\n\n"
        f"choosing a solver: all images, 3-fold cross-validation\n{comparison.table()}"
    )


def is_finished_demo(root: Path) -> bool:
    """Whether `root` holds the demo this version of ensir-flow makes, finished: an ensir-flow demo
    folder (`targets.kind_of`) with every entry the demo writes, whose last store written (the
    whole corpus's, `corpus.zarr`) was committed by this version's predict. The demo has no option
    but its folder, and this version builds the same corpus and models every time."""
    if targets.kind_of(root) != targets.DEMO_FOLDER or {path.name for path in root.iterdir()} != DEMO_ENTRIES:
        return False
    try:
        attrs = json.loads((root / "corpus.zarr" / "zarr.json").read_text()).get("attributes") or {}
    except (OSError, ValueError, AttributeError):
        return False
    return attrs.get("created_by") == f"ensir-flow {ensir_flow.__version__} predict"
