"""The quick-start job: the whole workflow on a demo corpus built from scikit-image's sample photos.

From degraded inputs and model files, as a user starts: the three restorers are saved as
`torch.export` programs and run by `predict`. Half the images are the reference set (fit), the
other half are held out (apply, evaluate), so the figures it prints are out-of-sample, as a user's
would be.
"""

import shutil
from pathlib import Path

from ensir_flow.binning import DEFAULT_BIN_WIDTH
from ensir_flow.demo_corpus import build_demo_corpus, save_demo_models
from ensir_flow.images import GROUND_TRUTH_DIR, INPUT_DIR
from ensir_flow.models import model_file

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
    """Plan the demo run in `directory` (created; replaced with --overwrite)."""
    root = Path(directory)
    refuse_existing(str(root), overwrite)
    paths = {name: root / name for name in DEMO_ENTRIES}

    def execute(compute):
        if root.exists():
            shutil.rmtree(root)
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
        evaluation = plan_evaluate(str(paths["heldout.zarr"]), str(paths["ensemble.zarr"])).run(compute)
        plan_predict(paths["corpus"], str(paths["corpus.zarr"]), models).run(compute)
        comparison = plan_cross_validation(str(paths["corpus.zarr"]), 3, ["em", "lsq"], [DEFAULT_BIN_WIDTH]).run(compute)
        return (
            f"EnsIR (em) LUT fitted on {paths['reference']}, applied to the held-out images of {paths['heldout']}:\n"
            f"{evaluation.table()}\nensembled PNGs: {paths['ensemble-png']}\n\n"
            f"choosing a solver: all images, 3-fold cross-validation\n{comparison.table()}"
        )

    details = {
        "directory": str(root),
        "corpus": "scikit-image sample photos, blurred + noise, 3 classical restorers (torch.export programs)",
        "steps": f"predict reference + held-out halves, fit (em, bin width {DEFAULT_BIN_WIDTH}), apply + export, evaluate; "
        "then 3-fold cross-validation of em and lsq on all images",
    }
    return Plan("demo: the whole workflow on an embedded corpus", details, execute)
