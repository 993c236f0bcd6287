"""Build the task, the backbone with the task's head, the modality, and load the data the model will train on (the
backbone fixes the preprocessing, the modality decodes with it)."""

from __future__ import annotations

from edgetl.backbones import build_backbone
from edgetl.config import Recipe
from edgetl.data import NO_SPARE, load_data, open_sources
from edgetl.errors import EdgetlError
from edgetl.modalities import modality_for
from edgetl.state import State
from edgetl.tasks import create_task


def run(state: State, recipe: Recipe) -> State:
    transfer = recipe.distill.transfer_size if recipe.distill else 0
    if recipe.data.unlabelled_path and transfer <= 0:
        raise EdgetlError(
            "data.unlabelled_path is only used by distillation's transfer set: set "
            "distill.transfer_size (e.g. --set distill.transfer_size=5000) or remove it"
        )
    sources = open_sources(recipe.data, recipe.task.kind)  # class names first: the head needs their count
    if recipe.data.kind == "hf_dataset":  # a datasets directory holds images or texts: the backbone must match
        images = not isinstance(next(iter(sources[0].values())).items[0], (str, tuple))
        if images == recipe.backbone.name.startswith("hf:"):
            raise EdgetlError(
                f"data.path {recipe.data.path} holds {'images' if images else 'texts'} but {recipe.backbone.name} "
                f"is {'a text' if images else 'an image'} backbone"
            )
    task = create_task(recipe.task.kind, sources[1], recipe.task)
    backbone = build_backbone(recipe.backbone, task)
    if recipe.prune is not None:  # a model the prune stage cannot prune fails now, not after the fine-tune
        from edgetl.compress.prune import seq2seq_layers

        seq2seq_layers(getattr(backbone.model, "model", None))
    pre = backbone.contract.preprocess
    tokenizer = None
    if backbone.tokenizer_file is not None:
        from edgetl.runner import load_tokenizer

        pre["max_length"] = recipe.data.max_length
        tokenizer = load_tokenizer(backbone.tokenizer_file, recipe.data.max_length)
    if getattr(task, "generates", False):  # seq2seq: target texts are tokenized too, and decoded for the metric
        from edgetl.runner import load_tokenizer

        task.tokenizer = load_tokenizer(backbone.tokenizer_file, recipe.task.max_target_length)
    modality = modality_for(
        pre, tokenizer, words=getattr(task, "words", False), target=getattr(task, "tokenizer", None)
    )
    data = load_data(recipe.data, modality, recipe.seed, sources)
    if transfer > 0 and not data.n_spare:  # now, not after fine-tuning
        raise EdgetlError(NO_SPARE)
    print(
        f"  {recipe.backbone.name}: {task.name}, "
        f"{f'{len(data.classes)} classes, ' if data.classes else ''}"
        f"train/val/test {len(data.train)}/{len(data.val)}/{len(data.test)}, {modality.describe()}"
    )
    return state.replace(task=task, modality=modality, data=data, backbone=backbone, tokenizer=tokenizer)
