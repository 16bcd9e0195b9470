"""Class predictions for image files, with the model's own class names, normalisation and evaluation view.

Images are decoded one by one (a bad file becomes an error entry for that file, the rest go on), brought
to the model's input size by its evaluation view, and run in batches.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .errors import UserError, user_path


def find_images(inputs: list[str], problems: list[dict] | None = None) -> list[str]:
    """Files named directly, plus every image file under named directories (recursively, sorted, by the
    ImageFolder scan's rules: hidden names skipped, linked folders followed once, loops skipped). A subfolder
    that cannot be read is skipped and, when `problems` is given, added to it as {"path", "error"}."""
    from .data.folder import image_files_under

    out: list[str] = []
    unreadable: list[tuple[str, str]] = []
    for item in inputs:
        try:
            p = user_path(item)
        except UserError:  # ~nosuchuser/...: reported for that file, like a missing one; the rest go on
            out.append(item)
            continue
        if p.is_dir():
            out.extend(e.path for e in image_files_under(p, unreadable))
        else:
            out.append(str(p))  # a missing file is reported per file, like a bad one
    if problems is not None:
        problems.extend({"path": d, "error": f"is a folder that cannot be read ({why})"} for d, why in unreadable)
    if not out:
        raise UserError(f"no image files found in {', '.join(inputs)}; pass image files or folders of them.")
    return out


def prepare(img: torch.Tensor, meta: dict) -> torch.Tensor:
    """uint8 C x H x W -> the normalised float view(s) the model was evaluated on: C x h x w, or V x C x h x w.

    "full" (CIFAR): the image itself when it already has the model's input size, else shorter side resized
    to that size and centre-cropped. "center"/"10crop"/"multiscale": the data module's views, scaled to the
    model's input size (resize = crop * 256/224, as the paper's 256/224).
    """
    from .data.views import ViewBatch, canonical_view, center_view, make_views
    from .evaluate import view_config

    _, h, w = (int(v) for v in meta["input_size"])
    x = img.float().unsqueeze(0)
    view = canonical_view(meta.get("eval_view") or "center")
    if view in ("full", "flip"):
        if tuple(x.shape[-2:]) != (h, w):
            x = center_view(x, resize=min(h, w), crop=min(h, w))
        v = make_views(x, view)
    else:
        cfg = view_config(meta)
        v = make_views(x, view, cfg)
        if isinstance(v, ViewBatch) and view == "multiscale":  # sizes differ: keep predict at one scale
            v = make_views(x, "10crop", cfg)
    views = v.groups[0][0] if isinstance(v, ViewBatch) else v
    mean = torch.tensor(meta["mean"]).view(1, -1, 1, 1) * 255
    std = torch.tensor(meta["std"]).view(1, -1, 1, 1) * 255
    views = (views - mean) / std
    return views[0] if views.shape[0] == 1 else views


def predict_files(predict: Callable[[torch.Tensor], torch.Tensor], meta: dict, paths: list[str], *,
                  topk: int = 5, batch_size: int = 32) -> list[dict]:
    """[{"path", "predictions": [{"label", "prob"}, ...]}] in input order; a bad file gets {"path", "error"}."""
    from .data.decode import BadImage, check_aspect, decode_image

    classes = list(meta["classes"])
    k = max(1, min(topk, len(classes)))
    in_chans = int(meta["input_size"][0])
    results: list[dict] = [{"path": p} for p in paths]
    pending: list[tuple[int, torch.Tensor]] = []

    def flush() -> None:
        if not pending:
            return
        # Images with several views (10-crop) run as one flat batch, combined per image as eval does.
        from .data.views import combine_views

        view = meta.get("eval_view") or "center"
        counts = [t.shape[0] if t.dim() == 4 else 1 for _, t in pending]
        flat = torch.cat([t if t.dim() == 4 else t.unsqueeze(0) for _, t in pending])
        logits = predict(flat).float().cpu()
        for (i, _), group in zip(pending, logits.split(counts), strict=True):
            top = torch.softmax(combine_views(group, view), dim=0).topk(k)
            results[i]["predictions"] = [{"label": classes[j], "prob": round(float(v), 6)}
                                         for v, j in zip(top.values, top.indices.tolist(), strict=True)]
        pending.clear()

    for i, path in enumerate(paths):
        try:
            img = torch.from_numpy(check_aspect(decode_image(path, in_chans)))
        except BadImage as err:
            results[i]["error"] = f"{err}"
            continue
        pending.append((i, prepare(img, meta)))
        if len(pending) >= batch_size:
            flush()
    flush()
    return results
