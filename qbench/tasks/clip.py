"""Contrastive image-text fine-tuning of a CLIP model, evaluated by retrieval recall@k."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from qbench.data import builtin_names
from qbench.data.pairs import CaptionPairs, ClipSplit, open_image, positives
from qbench.tasks.batch import Batch, TaskBase, endless
from qbench.tasks.metrics import contrastive_loss, recall_at_k

if TYPE_CHECKING:
    from qbench.suite.spec import LoadedSuite


def load_splits(loaded_suite: LoadedSuite) -> tuple[ClipSplit, ClipSplit, dict[str, Any]]:
    """(train, eval) splits of the suite's data and record fields describing them."""
    data = loaded_suite.suite.data
    if data.kind == "builtin":
        from qbench.data import shapes

        if data.name not in builtin_names("clip"):
            raise ValueError(f"unknown builtin image-text dataset {data.name!r}; builtin: {', '.join(builtin_names('clip'))}")
        train, held_out = shapes.make_split("shifted-train"), shapes.make_split("shifted-eval")
        source = "builtin:shapes (generated; splits shifted-train / shifted-eval)"
    elif data.kind == "tsv":
        from qbench.data.tsv import load_tsv

        root = loaded_suite.resolve(data.image_root)
        train = load_tsv(loaded_suite.resolve(data.train), root)
        held_out = load_tsv(loaded_suite.resolve(data.eval), root)
        source = f"tsv: {data.train} / {data.eval}, images under {data.image_root}"
    else:
        raise ValueError(f"the clip task reads image-caption data (kind builtin or tsv), not {data.kind!r}")
    info = {
        "data.source": source,
        "data.train_images": len(train.images),
        "data.train_captions": len(train.captions),
        "data.eval_images": len(held_out.images),
        "data.eval_captions": len(held_out.captions),
    }
    return train, held_out, info


class ClipTask(TaskBase):
    """CLIPModel + tokenizer + image processor; symmetric contrastive loss; recall@k both ways."""

    name = "clip"
    model_class_name = "CLIPModel"
    peft_task_type = None

    def prepare_data(self) -> dict[str, Any]:
        from transformers import AutoImageProcessor, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path, revision=self.suite.model.revision)
        self.image_processor = AutoImageProcessor.from_pretrained(self.model_path, revision=self.suite.model.revision)
        self.train_split, self.eval_split, info = load_splits(self.loaded_suite)
        info["eval.protocol"] = (
            "recall@k over the held-out split, image->text and text->image; a query counts if any true "
            "match is in the top k; ties count against the query"
        )
        return info

    def _collate(self, items: list[tuple[Any, str]]) -> Batch:
        images, captions = zip(*items, strict=True)
        text = self.tokenizer(
            list(captions), padding=True, truncation=True, max_length=self.suite.train.max_length, return_tensors="pt"
        )
        pixels = self.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
        inputs = {"input_ids": text["input_ids"], "attention_mask": text["attention_mask"], "pixel_values": pixels}
        return Batch(inputs, samples=len(captions), tokens=int(text["attention_mask"].sum()))

    def train_batches(self, seed: int) -> Iterator[Batch]:
        generator = torch.Generator().manual_seed(seed)
        loader = torch.utils.data.DataLoader(
            CaptionPairs(self.train_split),
            batch_size=self.suite.train.batch_size,
            shuffle=True,
            drop_last=True,
            generator=generator,
            num_workers=self.suite.data.num_workers,
            collate_fn=self._collate,
            persistent_workers=self.suite.data.num_workers > 0,
        )
        for batch in endless(loader):
            yield batch.to(self.device)

    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        outputs = model(**batch.inputs, return_loss=False)
        return contrastive_loss(outputs.logits_per_image, outputs.logits_per_text)

    @staticmethod
    def _pooled(output: Any) -> torch.Tensor:
        return output.pooler_output if hasattr(output, "pooler_output") else output

    @torch.no_grad()
    def _embed(self, model: torch.nn.Module, split: ClipSplit) -> tuple[torch.Tensor, torch.Tensor]:
        size = self.suite.eval.batch_size
        image_embeds, text_embeds = [], []
        for start in range(0, len(split.images), size):
            images = [open_image(i) for i in split.images[start : start + size]]
            pixels = self.image_processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
            image_embeds.append(self._pooled(model.get_image_features(pixel_values=pixels)).float())
        for start in range(0, len(split.captions), size):
            text = self.tokenizer(
                split.captions[start : start + size],
                padding=True,
                truncation=True,
                max_length=self.suite.train.max_length,
                return_tensors="pt",
            ).to(self.device)
            text_embeds.append(self._pooled(model.get_text_features(**text)).float())
        images = torch.nn.functional.normalize(torch.cat(image_embeds), dim=-1)
        texts = torch.nn.functional.normalize(torch.cat(text_embeds), dim=-1)
        return images.cpu(), texts.cpu()

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        was_training = model.training
        model.eval()
        try:
            images, texts = self._embed(model, self.eval_split)
        finally:
            model.train(was_training)
        similarity = texts @ images.T  # [captions, images]
        ks = self.suite.eval.recall_k
        matches = positives(self.eval_split)
        t2i = recall_at_k(similarity, matches, ks)
        i2t = recall_at_k(similarity.T, matches.T, ks)
        metrics: dict[str, float] = {}
        for k in ks:
            metrics[f"i2t_recall@{k}"] = i2t[k]
            metrics[f"t2i_recall@{k}"] = t2i[k]
            metrics[f"mean_recall@{k}"] = (i2t[k] + t2i[k]) / 2
        return metrics
