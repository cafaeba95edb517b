"""Contrastive image-text fine-tuning of a CLIP model, evaluated by retrieval recall@k."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from qbench.cell.data.pairs import CaptionPairs, ClipSplit, duplicate_captions, open_image, positives
from qbench.cell.tasks.batch import Batch, Evaluation, TaskBase, endless
from qbench.cell.tasks.metrics import contrastive_loss, hits_at_k, match_ranks, nonfinite_rows
from qbench.contract import intervals, lengths
from qbench.contract.tasks import builtin_names

BOOTSTRAP_METHOD = (
    "percentile bootstrap over eval queries: captions (t2i) and images (i2t) resampled with replacement, "
    "each direction on its own; mean recall from the two resampled recalls"
)

if TYPE_CHECKING:
    from qbench.contract.suite import LoadedSuite


def builtin_splits(name: str) -> tuple[ClipSplit, ClipSplit]:
    """The (train, eval) splits of a builtin image-text set, generated once per process."""
    from qbench.cell.data import shapes
    from qbench.machine import memo as shared

    if name not in builtin_names("clip"):
        raise ValueError(f"unknown builtin image-text dataset {name!r}; builtin: {', '.join(builtin_names('clip'))}")
    train, held_out = (shared.memo(("shapes split", split), lambda split=split: shapes.make_split(split))
                       for split in ("shifted-train", "shifted-eval"))
    return train, held_out


def load_splits(loaded_suite: LoadedSuite, read: dict[str, str] | None = None) -> tuple[ClipSplit, ClipSplit, dict[str, Any]]:
    """(train, eval) splits of the suite's data and record fields describing them. `read` gets, per suite key
    ("data.train", "data.eval"), the sha256 of the annotation file as read, or of the generated split's content:
    what the data fingerprint of the run's checks says of them."""
    from qbench.contract.fingerprint import FileHashes

    data = loaded_suite.suite.data
    hashes = FileHashes()
    if data.kind == "builtin":
        from qbench.cell.data import shapes

        train, held_out = builtin_splits(data.name)
        if read is not None:
            for key, split in (("data.train", train), ("data.eval", held_out)):
                hashes.add_data_file(key, shapes.content_bytes(split))
        source = "builtin:shapes (generated; splits shifted-train / shifted-eval)"
    elif data.kind == "tsv":
        from qbench.cell.data.tsv import load_tsv

        root = loaded_suite.resolve(data.image_root)
        train = load_tsv(loaded_suite.resolve(data.train), root, hashes=hashes, key="data.train")
        held_out = load_tsv(loaded_suite.resolve(data.eval), root, hashes=hashes, key="data.eval")
        source = f"tsv: {data.train} / {data.eval}, images under {data.image_root}"
    else:
        raise ValueError(f"the clip task reads image-caption data (kind builtin or tsv), not {data.kind!r}")
    if read is not None:
        read.update(hashes.data_file)
    info = {
        "data.source": source,
        "data.train_images": len(train.images),
        "data.train_captions": len(train.captions),
        "data.eval_images": len(held_out.images),
        "data.eval_captions": len(held_out.captions),
    }
    return train, held_out, info


class EpochOrder(torch.utils.data.RandomSampler):
    """A shuffled order of `size` examples per epoch, drawn from `seed` alone, whatever data.num_workers is.

    torch's DataLoader draws its workers' base seed from the generator it is given each time it makes an
    iterator: every epoch without workers, once with persistent workers. Shuffling from that generator
    made the order from the second epoch on depend on the number of workers. This sampler shuffles from
    a generator of its own, drawing from it what a single-process `DataLoader(shuffle=True, generator=...)`
    draws each epoch (the base seed, then RandomSampler's draws), so its order is that of a plain torch loop."""

    def __init__(self, size: int, seed: int):
        super().__init__(range(size), generator=torch.Generator().manual_seed(seed))

    def __iter__(self) -> Iterator[int]:
        torch.empty((), dtype=torch.int64).random_(generator=self.generator)  # the base seed a plain loader draws
        yield from super().__iter__()


def in_memory(split: ClipSplit) -> bool:
    """Whether the split's images are held in memory (generated data), not read from files."""
    return not any(isinstance(image, (str, Path)) for image in split.images)


class ClipTask(TaskBase):
    """CLIPModel + tokenizer + image processor; symmetric contrastive loss; recall@k both ways."""

    name = "clip"
    model_class_name = "CLIPModel"
    peft_task_type = None

    def prepare_data(self) -> dict[str, Any]:
        from transformers import AutoConfig

        from qbench.machine import memo as shared

        revision = self.suite.model.revision
        self.tokenizer, self.image_processor = shared.memo(("clip processors", self.model_path, revision), self._processors)
        limit = lengths.clip_limit(AutoConfig.from_pretrained(self.model_path, revision=revision))
        problems = lengths.length_problems(self.suite, limit)
        if problems:  # the checks before the run say so too; this keeps a cell honest when called on its own
            raise ValueError("; ".join(problems))
        self.max_length, source = lengths.train_max_length(self.suite, limit)
        self.train_split, self.eval_split, info = load_splits(self.loaded_suite, self.data_read)
        self.positives = positives(self.eval_split, self._model_text)
        info["data.eval_duplicate_captions"] = duplicate_captions(self.eval_split, self._model_text)
        info.update(limit.record())
        info.update({"config.train.max_length": self.max_length, "train.max_length_source": source})
        info["eval.text_max_length_tokens"] = self.max_length
        info["data.train_captions_truncated"] = self.truncated(self.train_split.captions)
        info["data.eval_captions_truncated"] = self.truncated(self.eval_split.captions)
        # images held in memory (generated data) are preprocessed once per run, not once per batch per cell
        self.train_pixels, self.eval_pixels = (
            shared.memo(("clip pixels", self.model_path, revision, name), lambda split=split: self._preprocessed(split))
            if in_memory(split) else None
            for name, split in (("train", self.train_split), ("eval", self.eval_split))
        )
        info["eval.protocol"] = (
            "recall@k over the held-out split, image->text and text->image; a query counts if any true "
            "match is in the top k; ties count against the query; captions the model reads as the same "
            "tokens are positives of every image carrying one; a non-finite score never matches"
        )
        info["data.images_preprocessed_once"] = self.train_pixels is not None
        return info

    def _model_text(self, caption: str) -> tuple[int, ...]:
        """A caption as the text tower reads it: its token ids after truncation to train.max_length."""
        ids = self.tokenizer(caption, truncation=True, max_length=self.max_length)["input_ids"]
        return tuple(ids)
    def _processors(self) -> tuple[Any, Any]:
        from transformers import AutoImageProcessor, AutoTokenizer

        revision = self.suite.model.revision
        return (AutoTokenizer.from_pretrained(self.model_path, revision=revision),
                AutoImageProcessor.from_pretrained(self.model_path, revision=revision))

    def _preprocessed(self, split: ClipSplit) -> torch.Tensor:
        """pixel_values of every image of the split, [images, 3, H, W], as the processor gives them batch by
        batch (it treats each image alone, so a row is the same whichever batch it came in)."""
        size = self.suite.eval.batch_size
        return torch.cat([
            self.image_processor(images=[open_image(i) for i in split.images[start : start + size]], return_tensors="pt")["pixel_values"]
            for start in range(0, len(split.images), size)
        ])

    def _pixel_values(self, images: list[Any], pixels: torch.Tensor | None) -> torch.Tensor:
        """The batch's pixel_values: rows of the preprocessed split (images are then indices), or processed now."""
        if pixels is not None:
            return pixels[list(images)]
        return self.image_processor(images=[open_image(i) for i in images], return_tensors="pt")["pixel_values"]

    def truncated(self, captions: list[str]) -> int:
        """How many captions are longer than the max_length tokens (cut to it, as CLIP's tokenizer cuts at 77)."""
        limit = self.max_length
        return sum(len(ids) > limit for ids in self.tokenizer(list(captions), truncation=False)["input_ids"])

    def _collate(self, items: list[tuple[Any, str]]) -> Batch:
        images, captions = zip(*items, strict=True)
        # a suite with a [fit] table trains every step at the longest sequence, as fit's trials must
        padding = "max_length" if self.suite.fit is not None else True
        text = self.tokenizer(
            list(captions), padding=padding, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        pixels = self._pixel_values(list(images), self.train_pixels)
        inputs = {"input_ids": text["input_ids"], "attention_mask": text["attention_mask"], "pixel_values": pixels}
        return Batch(inputs, samples=len(captions), tokens=int(text["attention_mask"].sum()))

    def train_batches(self, seed: int) -> Iterator[Batch]:
        """Shuffled batches, epoch after epoch, in an order drawn from the seed alone.

        The order has a generator of its own (EpochOrder); the loader's generator seeds its workers only."""
        pairs = CaptionPairs(self.train_split, indices=self.train_pixels is not None)
        order = EpochOrder(len(pairs), seed)
        loader = torch.utils.data.DataLoader(
            pairs,
            batch_size=self.suite.train.batch_size,
            sampler=order,
            drop_last=True,
            generator=torch.Generator().manual_seed(seed),  # the workers' seeds only
            num_workers=self.suite.data.num_workers,
            collate_fn=self._collate,
            persistent_workers=self.suite.data.num_workers > 0,
        )
        for batch in endless(loader):
            yield batch.to(self.device)

    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        outputs = model(**batch.inputs, return_loss=False)
        return contrastive_loss(outputs.logits_per_image, outputs.logits_per_text)

    def contrastive_fields(self) -> dict[str, Any]:
        """`train.contrastive_batch_size`: the pairs whose features one contrastive loss compares (each query's
        positive and its negatives), and `train.negatives_per_query`, one less: with `micro_batch` accumulation
        the micro-batch's (train.batch_size), with `step` every micro-batch's of the step."""
        train = self.suite.train
        size = train.batch_size * (train.grad_accum if train.contrastive_batch == "step" else 1)
        return {"train.contrastive_batch": train.contrastive_batch or "micro_batch",
                "train.contrastive_batch_size": size, "train.negatives_per_query": size - 1}

    def accumulate(self) -> Any:
        """How a step accumulates its micro-batches: None (the shared loop's mean of micro-batch losses) unless
        train.contrastive_batch = "step", then `step_over_cached_features`."""
        return self.step_over_cached_features if self.suite.train.contrastive_batch == "step" else None

    @staticmethod
    def _normalised(features: torch.Tensor) -> torch.Tensor:
        # as CLIPModel.forward normalises (transformers' _get_vector_norm), so one micro-batch gives its forward's loss
        return features / torch.pow(torch.sum(torch.pow(features, 2), dim=-1, keepdim=True), 0.5)

    def _features(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(image, text) features of a batch, normalised, as CLIPModel.forward computes them."""
        inputs = batch.inputs
        images = self._pooled(model.get_image_features(pixel_values=inputs["pixel_values"]))
        texts = self._pooled(model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]))
        return self._normalised(images), self._normalised(texts)

    @staticmethod
    def _features_loss(model: torch.nn.Module, images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
        logits_per_text = torch.matmul(texts, images.t()) * model.logit_scale.exp()
        return contrastive_loss(logits_per_text.t(), logits_per_text)

    def step_over_cached_features(self, model: torch.nn.Module, batches: Iterator[Batch]) -> tuple[float, int, int]:
        """One optimizer step whose contrastive loss spans all its micro-batches (open_clip's --accum-freq):
        every micro-batch's features computed without gradients and kept; then, micro-batch by micro-batch, its
        features computed again with gradients in place of the kept ones, the loss over all of them taken and
        backpropagated. The summed gradients are those of the loss over the whole step's pairs, while the memory
        of activations is one micro-batch's. Returns the step's loss (over the kept features), samples, tokens."""
        micro = [next(batches) for _ in range(self.suite.train.grad_accum)]
        with torch.no_grad():
            kept = [self._features(model, batch) for batch in micro]
            loss = self._features_loss(model, torch.cat([k[0] for k in kept]), torch.cat([k[1] for k in kept])).item()
        for index, batch in enumerate(micro):
            images, texts = self._features(model, batch)
            all_images = torch.cat([k[0] for k in kept[:index]] + [images] + [k[0] for k in kept[index + 1 :]])
            all_texts = torch.cat([k[1] for k in kept[:index]] + [texts] + [k[1] for k in kept[index + 1 :]])
            self._features_loss(model, all_images, all_texts).backward()
        return loss, sum(b.samples for b in micro), sum(b.tokens for b in micro)

    @staticmethod
    def _pooled(output: Any) -> torch.Tensor:
        return output.pooler_output if hasattr(output, "pooler_output") else output

    @torch.no_grad()
    def _embed(self, model: torch.nn.Module, split: ClipSplit) -> tuple[torch.Tensor, torch.Tensor]:
        size = self.suite.eval.batch_size
        image_embeds, text_embeds = [], []
        for start in range(0, len(split.images), size):
            wanted = range(start, min(start + size, len(split.images)))
            images = list(wanted) if self.eval_pixels is not None else [split.images[i] for i in wanted]
            pixels = self._pixel_values(images, self.eval_pixels).to(self.device)
            image_embeds.append(self._pooled(model.get_image_features(pixel_values=pixels)).float())
        for start in range(0, len(split.captions), size):
            text = self.tokenizer(
                split.captions[start : start + size],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            text_embeds.append(self._pooled(model.get_text_features(**text)).float())
        images = torch.nn.functional.normalize(torch.cat(image_embeds), dim=-1)
        texts = torch.nn.functional.normalize(torch.cat(text_embeds), dim=-1)
        return images.cpu(), texts.cpu()

    def evaluate(self, model: torch.nn.Module) -> Evaluation:
        was_training = model.training
        model.eval()
        try:
            images, texts = self._embed(model, self.eval_split)
        finally:
            model.train(was_training)
        return retrieval_evaluation(texts @ images.T, self.positives, self.suite.eval.recall_k, {
            "nonfinite_image_embeddings": nonfinite_rows(images),
            "nonfinite_text_embeddings": nonfinite_rows(texts),
        })


def _recall(hits, axis):
    return hits.mean(axis=axis)


def _mean_recall(t2i, i2t, axis):
    return (t2i.mean(axis=axis) + i2t.mean(axis=axis)) / 2


def retrieval_evaluation(similarity: torch.Tensor, matches: torch.Tensor, ks: tuple[int, ...],
                         counts: dict[str, int] | None = None) -> Evaluation:
    """Recall@k both ways from a [captions, images] similarity and positive matrix, with a bootstrap
    interval for each recall (`intervals`), plus the given counts of non-finite outputs as metrics."""
    hits = {
        "t2i": hits_at_k(match_ranks(similarity, matches), ks).to(torch.float64),  # [captions, k]
        "i2t": hits_at_k(match_ranks(similarity.T, matches.T), ks).to(torch.float64),  # [images, k]
    }
    # numpy arrays [k, units]: each k's hits of one direction's queries, resampled together
    t2i, i2t = (hits[d].numpy().T for d in ("t2i", "i2t"))
    bootstrapped = {
        "t2i": intervals.bootstrap([t2i], _recall, paired=True),
        "i2t": intervals.bootstrap([i2t], _recall, paired=True),
        # captions and images are different units: each drawn on its own, the mean of the two resampled recalls
        "mean": intervals.bootstrap([t2i, i2t], _mean_recall, paired=False),
    }
    metrics: dict[str, float] = {}
    found: dict[str, intervals.Interval] = {}
    for i, k in enumerate(ks):
        recall = {d: int(h[:, i].sum()) / h.shape[0] for d, h in hits.items()}  # exact shares
        recall["mean"] = (recall["i2t"] + recall["t2i"]) / 2
        for direction in ("i2t", "t2i", "mean"):
            name = f"{direction}_recall@{k}"
            metrics[name] = recall[direction]
            found[name] = bootstrapped[direction][i]
    metrics.update(counts or {})
    return Evaluation(metrics, found, BOOTSTRAP_METHOD)
