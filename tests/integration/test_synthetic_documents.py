"""Synthetic data with data.document_attention: the trainer's loss is the loss of each document run on its own
(attention and positions restart at every document). The loader's documents: tests/unit/test_global_batch.py."""

import tempfile

import torch

from configs.schema import load_config
from tests.integration.train_utils import SYNTHETIC


def test_trainer_loss_with_synthetic_documents_is_the_loss_of_each_document_alone():
    from training.loop import Trainer

    with tempfile.TemporaryDirectory() as out:
        overrides = [*SYNTHETIC, f"checkpoint.dir={out}", "data.document_attention=true", "data.seq_len=48"]
        trainer = Trainer(load_config(None, overrides), resume=False)
        batch = next(iter(trainer.loader))
        assert "document_ids" in batch
        _, ce, _ = trainer.micro_batch_loss(batch)
        model, ids, targets, docs = trainer.model, batch["input_ids"], batch["targets"], batch["document_ids"]
        assert (docs[:, -1] > 0).any(), "no sequence with two documents: the check would see nothing"
        nll, n = torch.zeros((), dtype=torch.float64), 0
        with torch.no_grad():
            for row in range(ids.shape[0]):
                for d in docs[row].unique():
                    span = (docs[row] == d).nonzero().squeeze(1)  # (len,): one document's positions
                    part = slice(int(span[0]), int(span[-1]) + 1)
                    loss = model(ids[row : row + 1, part], targets=targets[row : row + 1, part]).loss
                    nll += loss.double() * span.numel()
                    n += span.numel()
        assert abs(ce.item() - (nll / n).item()) < 1e-5
