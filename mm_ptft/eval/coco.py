"""The ``coco`` evaluator: COCO mAP, mAP@0.5 and per-class AP of a detector task on the held-out shards, scored with
pycocotools.

Every rank predicts its share of the held-out images (``EvalContext.iterate`` keeps ranks in lock-step, so ZeRO-3's
collective parameter gathering never waits on a rank without data); boxes are gathered, rank 0 scores them with
pycocotools and broadcasts the metrics, so every rank returns the same numbers (best-checkpoint selection runs
on every rank). Rank 0 also draws its first few images with their predictions into ``plots/detections.png``
(``eval.settings.coco.draw_images`` of them, predictions above ``draw_score``).
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path

import torch

from mm_ptft.data import DataError
from mm_ptft.distributed import all_gather_tensor, broadcast_object, is_main_process
from mm_ptft.eval.base import Detector, EvalContext, register_evaluator

DRAWING = "detections.png"
CLASS_AP = "class_ap.png"


@dataclass
class CocoSettings:
    draw_images: int = 6  # held-out images drawn with their predictions into the run report (0 → none)
    draw_score: float = 0.5  # predictions drawn above this score


def _rows(image_ids: torch.Tensor, boxes: torch.Tensor, *columns: torch.Tensor) -> torch.Tensor:
    """(N, 5 + len(columns)) float64 rows: image id, x, y, w, h, columns… (xyxy boxes → COCO xywh)."""
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).double()
    return torch.cat([image_ids.double()[:, None], xywh, *(c.double()[:, None] for c in columns)], dim=1)


@register_evaluator("coco", needs=(Detector,), settings=CocoSettings)
def evaluate_coco(ctx: EvalContext) -> dict[str, float]:
    """COCO box metrics (``map``, ``map_50``, ``map_75``, …, ``ap/<class>``, ``ap50/<class>``) via pycocotools."""
    task = ctx.task
    settings: CocoSettings = ctx.setting("coco")
    images, truths, found = [], [], []
    drawn: list[tuple] = []
    for batch, real in ctx.iterate():
        predictions = task.predict(batch)
        if not real:
            continue
        pictures = batch["image"]
        for i, (image_id, target, pred) in enumerate(zip(batch["image_id"].tolist(), batch["targets"], predictions)):
            height, width = pictures[i].shape[-2:]
            images.append(torch.tensor([image_id, width, height], dtype=torch.float64))
            ids = torch.full((len(target["boxes"]),), image_id)
            truths.append(_rows(ids, target["boxes"].cpu(), target["labels"].cpu(), target["iscrowd"].cpu()))
            ids = torch.full((len(pred["boxes"]),), image_id)
            found.append(_rows(ids, pred["boxes"], pred["labels"], pred["scores"]))
            if len(drawn) < settings.draw_images:
                drawn.append((pictures[i].cpu(), {k: v.cpu() for k, v in target.items()}, pred))
    image_rows = all_gather_tensor(torch.stack(images) if images else torch.zeros(0, 3, dtype=torch.float64))
    truth_rows = all_gather_tensor(torch.cat(truths) if truths else torch.zeros(0, 7, dtype=torch.float64))
    found_rows = all_gather_tensor(torch.cat(found) if found else torch.zeros(0, 7, dtype=torch.float64))
    if truth_rows.shape[0] == 0:  # checked on every rank: no rank may wait in the broadcast for a failed one
        raise DataError("data: the coco evaluator found no ground-truth boxes in the held-out data (eval.data)")
    metrics = None
    if is_main_process():
        metrics = _score(image_rows, truth_rows, found_rows, task.categories)
        if ctx.out_dir is not None and drawn:
            path = Path(ctx.out_dir) / "plots" / DRAWING
            draw_detections(drawn, task.categories, settings.draw_score, path)
            caption = f"Detections on held-out images (score ≥ {settings.draw_score:g}; ground truth dashed white)"
            ctx.images[caption] = path
        if ctx.out_dir is not None:
            path = plot_class_ap(metrics, task.categories, Path(ctx.out_dir) / "plots" / CLASS_AP)
            ctx.images["COCO AP per class"] = path
    return broadcast_object(metrics)


def _score(image_rows: torch.Tensor, truth_rows: torch.Tensor, found_rows: torch.Tensor, categories: list[dict]):
    """Rows → COCO dicts (model labels 1..K are the categories' positions + 1) → :func:`coco_map`."""
    ids = [c["id"] for c in categories]
    images = [{"id": int(r[0]), "width": int(r[1]), "height": int(r[2])} for r in image_rows.tolist()]
    truths = [
        {"image_id": int(r[0]), "bbox": r[1:5], "category_id": ids[int(r[5]) - 1], "iscrowd": int(r[6])}
        for r in truth_rows.tolist()
    ]
    found = [
        {"image_id": int(r[0]), "bbox": r[1:5], "category_id": ids[int(r[5]) - 1], "score": r[6]}
        for r in found_rows.tolist()
        if 1 <= int(r[5]) <= len(ids)  # RetinaNet/FCOS may score the unused background class 0
    ]
    metrics = coco_map(images, truths, found, categories)
    metrics.update(n_images=float(len(images)), n_boxes=float(len(truths)), n_detections=float(len(found)))
    return metrics


def plot_class_ap(metrics: dict[str, float], categories: list[dict], path: Path) -> Path:
    """Horizontal bars of AP@0.5 and AP@[.5:.95] per class (classes without ground truth are left out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [c["name"] for c in categories if f"ap/{metric_name(c['name'])}" in metrics]
    ap = [metrics[f"ap/{metric_name(n)}"] for n in names]
    ap50 = [metrics[f"ap50/{metric_name(n)}"] for n in names]
    fig, ax = plt.subplots(figsize=(6.5, 0.35 * len(names) + 1.2), constrained_layout=True)
    y = list(range(len(names)))
    ax.barh([v + 0.2 for v in y], ap50, height=0.4, label=f"AP@0.5 (mean {metrics['map_50']:.3f})")
    ax.barh([v - 0.2 for v in y], ap, height=0.4, label=f"AP@[.5:.95] (mean {metrics['map']:.3f})")
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("COCO average precision")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def draw_detections(samples: list[tuple], categories: list[dict], min_score: float, path: Path, scale: int = 3) -> Path:
    """Draw ``(image (C, H, W) in [0, 1], target, prediction)`` triples in a grid PNG; returns ``path``.

    Ground truth: dashed white boxes; predictions with ``score >= min_score``: one colour per class, labelled
    ``name score``. Images are enlarged ``scale`` times (nearest) so small objects and labels stay legible.
    """
    from PIL import Image, ImageDraw

    palette = [
        (230, 25, 75),
        (60, 180, 75),
        (255, 225, 25),
        (0, 130, 200),
        (245, 130, 48),
        (145, 30, 180),
        (70, 240, 240),
        (240, 50, 230),
        (210, 245, 60),
        (250, 190, 212),
        (0, 128, 128),
        (170, 110, 40),
    ]
    tiles = []
    for image, target, pred in samples:
        pixels = (image.clamp(0, 1) * 255).byte()
        mode = "L" if pixels.shape[0] == 1 else "RGB"
        array = pixels[0].numpy() if mode == "L" else pixels.permute(1, 2, 0).numpy()
        tile = Image.fromarray(array, mode).convert("RGB")
        tile = tile.resize((tile.width * scale, tile.height * scale), Image.NEAREST)
        draw = ImageDraw.Draw(tile)
        for box in target["boxes"].tolist():
            _dashed_box(draw, [v * scale for v in box], (255, 255, 255))
        for box, label, score in zip(pred["boxes"].tolist(), pred["labels"].tolist(), pred["scores"].tolist()):
            if score < min_score or not 1 <= label <= len(categories):
                continue
            color = palette[(label - 1) % len(palette)]
            x0, y0, x1, y1 = (v * scale for v in box)
            draw.rectangle([x0, y0, x1, y1], outline=color, width=2)
            text = f"{categories[label - 1]['name']} {score:.2f}"
            tx, ty = x0 + 2, max(y0 - 11, 0)
            draw.rectangle(draw.textbbox((tx, ty), text), fill=(0, 0, 0))
            draw.text((tx, ty), text, fill=color)
        tiles.append(tile)
    cols = min(3, len(tiles))
    rows = -(-len(tiles) // cols)
    width, height = tiles[0].size
    grid = Image.new("RGB", (cols * width + (cols - 1) * 4, rows * height + (rows - 1) * 4), (255, 255, 255))
    for i, tile in enumerate(tiles):
        grid.paste(tile, ((i % cols) * (width + 4), (i // cols) * (height + 4)))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    grid.save(tmp, format="PNG")
    tmp.replace(path)
    return path


def _dashed_box(draw, box: list[float], color: tuple[int, int, int], dash: int = 4) -> None:
    x0, y0, x1, y1 = box
    for a, b, fixed, horizontal in ((x0, x1, y0, True), (x0, x1, y1, True), (y0, y1, x0, False), (y0, y1, x1, False)):
        t = a
        while t < b:
            e = min(t + dash, b)
            draw.line([(t, fixed), (e, fixed)] if horizontal else [(fixed, t), (fixed, e)], fill=color, width=1)
            t += 2 * dash


# ---------------------------------------------------------------------------------------------------------------------
# COCO mAP via pycocotools
# ---------------------------------------------------------------------------------------------------------------------

STAT_NAMES = (
    "map",
    "map_50",
    "map_75",
    "map_small",
    "map_medium",
    "map_large",
    "mar_1",
    "mar_10",
    "mar_100",
    "mar_small",
    "mar_medium",
    "mar_large",
)


def metric_name(name: str) -> str:
    """A class name as a metric-name part: whitespace → '_' (``ap/ankle_boot``)."""
    return "_".join(name.split())


def coco_map(
    images: list[dict], ground_truth: list[dict], detections: list[dict], categories: list[dict]
) -> dict[str, float]:
    """COCO box metrics of ``detections`` against ``ground_truth`` (pycocotools' COCOeval, stdout silenced).

    Args:
        images: ``[{"id", "width", "height"}]`` — every evaluated image, with or without objects.
        ground_truth: ``[{"image_id", "bbox": [x, y, w, h], "category_id", "iscrowd"?}]``.
        detections: ``[{"image_id", "bbox": [x, y, w, h], "category_id", "score"}]``.
        categories: ``[{"id", "name"}]``.

    Returns:
        ``map`` (AP@[.5:.95]), ``map_50``, ``map_75``, size-range APs, ``mar_*`` recalls (COCOeval's 12 stats), and
        ``ap/<class>``, ``ap50/<class>`` for every class that has ground truth.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    def index(annotations: list[dict]) -> COCO:
        coco = COCO()
        anns = []
        for i, a in enumerate(annotations):
            w, h = a["bbox"][2], a["bbox"][3]
            # ids from 1: COCOeval marks "unmatched" with id 0
            anns.append({"iscrowd": 0, "area": w * h, **a, "id": i + 1})
        coco.dataset = {"images": images, "annotations": anns, "categories": categories}
        with contextlib.redirect_stdout(io.StringIO()):
            coco.createIndex()
        return coco

    if not ground_truth:
        raise DataError("data: COCO evaluation needs at least one ground-truth box in the held-out set")
    evaluator = COCOeval(index(ground_truth), index(detections), "bbox")
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    out = {name: float(v) for name, v in zip(STAT_NAMES, evaluator.stats, strict=True)}
    # precision: (IoU thresholds T, recall points R, classes K, area ranges A, max dets M); area 'all', 100 dets
    precision = evaluator.eval["precision"][:, :, :, 0, -1]
    names = {c["id"]: c["name"] for c in categories}
    for k, cat_id in enumerate(evaluator.params.catIds):
        p = precision[:, :, k]
        if (p > -1).any():  # -1: no ground truth of this class
            out[f"ap/{metric_name(names[cat_id])}"] = float(p[p > -1].mean())
            p50 = p[0]
            out[f"ap50/{metric_name(names[cat_id])}"] = float(p50[p50 > -1].mean())
    return out
