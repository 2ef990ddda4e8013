"""Lightning's own examples, written again for Kiln as a user would port them: only the imports renamed
(``lightning.pytorch`` -> ``framework``/``callbacks``, ``LightningModule`` -> ``TrainModule``,
``LightningDataModule`` -> ``DataModule``), MNIST/WikiText2 replaced by small synthetic data (no downloads
here), and run for a few batches. Each test mirrors one script of Lightning's ``examples/pytorch``:
basics/autoencoder.py, basics/backbone_image_classifier.py, basics/transformer.py,
domain_templates/generative_adversarial_net.py, bug_report/bug_report_model.py.

Each runs with its imports renamed and nothing else changed (synthetic data instead of downloads).
"""

from __future__ import annotations

import math
import os
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset, random_split

import framework as pl  # the renamed ``lightning.pytorch``
from framework import DataModule, Trainer, TrainModule, callbacks
from framework.utilities import rank_zero_only
from framework.utilities.imports import _TORCHVISION_AVAILABLE

FAST = {"limit_train_batches": 2, "limit_val_batches": 2, "limit_test_batches": 2, "limit_predict_batches": 2,
        "enable_progress_bar": False}


def synthetic_mnist(n: int, seed: int = 0) -> TensorDataset:
    """MNIST-shaped ``(image[1, 28, 28], label)`` pairs."""
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g))


class MNISTDataModule(DataModule):
    """``MyDataModule`` of the basics examples (and the GAN's ``MNISTDataModule``) on synthetic images."""

    def __init__(self, batch_size: int = 8) -> None:
        super().__init__()
        dataset = synthetic_mnist(48)
        self.mnist_test = synthetic_mnist(16, seed=1)
        self.mnist_train, self.mnist_val = random_split(dataset, [32, 16], generator=torch.Generator().manual_seed(42))
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.mnist_train, batch_size=self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.mnist_val, batch_size=self.batch_size)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.mnist_test, batch_size=self.batch_size)

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(self.mnist_test, batch_size=self.batch_size)


# ---- basics/autoencoder.py ------------------------------------------------------------------------------------

class ImageSampler(callbacks.Callback):
    def __init__(self, num_samples: int = 3) -> None:
        super().__init__()
        self.num_samples = num_samples
        self.generated: list[torch.Tensor] = []

    @rank_zero_only
    def on_train_epoch_end(self, trainer: Trainer, pl_module: TrainModule) -> None:
        images, _ = next(iter(DataLoader(trainer.datamodule.mnist_val, batch_size=self.num_samples)))
        images_flattened = images.view(images.size(0), -1)
        with torch.no_grad():
            pl_module.eval()
            images_generated = pl_module(images_flattened.to(pl_module.device))
            pl_module.train()
        self.generated.append(images_generated.reshape(images.shape))


class LitAutoEncoder(TrainModule):
    def __init__(self, hidden_dim: int = 64, learning_rate: float = 10e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.encoder = nn.Sequential(nn.Linear(28 * 28, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, 3))
        self.decoder = nn.Sequential(nn.Linear(3, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, 28 * 28))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._common_step(batch, batch_idx, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._common_step(batch, batch_idx, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._common_step(batch, batch_idx, "test")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int | None = None) -> torch.Tensor:
        return self(self._prepare_batch(batch))

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.learning_rate)

    def _prepare_batch(self, batch: Any) -> torch.Tensor:
        x, _ = batch
        return x.view(x.size(0), -1)

    def _common_step(self, batch: Any, batch_idx: int, stage: str) -> torch.Tensor:
        x = self._prepare_batch(batch)
        loss = F.mse_loss(x, self(x))
        self.log(f"{stage}_loss", loss, on_step=True)
        return loss


def test_autoencoder(tmp_path):
    pl.seed_everything(1234)
    sampler = ImageSampler()
    trainer = Trainer(callbacks=sampler, max_epochs=2, default_root_dir=str(tmp_path), **FAST)
    model, datamodule = LitAutoEncoder(), MNISTDataModule()
    trainer.fit(model, datamodule=datamodule)
    trainer.test(ckpt_path="best", datamodule=datamodule)
    predictions = trainer.predict(ckpt_path="best", datamodule=datamodule)
    assert predictions[0].shape == (8, 28 * 28)
    assert len(sampler.generated) == 2 and sampler.generated[0].shape == (3, 1, 28, 28)


# ---- basics/backbone_image_classifier.py ---------------------------------------------------------------------

class Backbone(nn.Module):
    def __init__(self, hidden_dim: int = 128) -> None:
        super().__init__()
        self.l1 = nn.Linear(28 * 28, hidden_dim)
        self.l2 = nn.Linear(hidden_dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(x.size(0), -1)
        return torch.relu(self.l2(torch.relu(self.l1(x))))


class LitClassifier(TrainModule):
    def __init__(self, backbone: Backbone | None = None, learning_rate: float = 0.0001) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["backbone"])
        self.backbone = backbone if backbone is not None else Backbone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_epoch=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("valid_loss", F.cross_entropy(self(x), y), on_step=True)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("test_loss", F.cross_entropy(self(x), y))

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int | None = None) -> torch.Tensor:
        x, _ = batch
        return self(x)

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.learning_rate)


def test_backbone_image_classifier(tmp_path):
    pl.seed_everything(1234)
    trainer = Trainer(max_epochs=1, default_root_dir=str(tmp_path), **FAST)
    model, datamodule = LitClassifier(), MNISTDataModule()
    trainer.fit(model, datamodule=datamodule)
    results = trainer.test(ckpt_path="best", datamodule=datamodule)
    assert "test_loss" in results[0]
    predictions = trainer.predict(ckpt_path="best", datamodule=datamodule)
    assert predictions[0].shape == (8, 10)


def test_backbone_classifier_reloads_from_its_checkpoint(tmp_path):
    """The classifier's hyperparameters (backbone ignored, as the example does) rebuild it from a checkpoint."""
    trainer = Trainer(max_epochs=1, default_root_dir=str(tmp_path), **FAST)
    datamodule = MNISTDataModule()
    model = LitClassifier(learning_rate=0.01)
    trainer.fit(model, datamodule.train_dataloader(), datamodule.val_dataloader())
    trainer.save_checkpoint(str(tmp_path / "manual"))
    loaded = LitClassifier.load_from_checkpoint(str(tmp_path / "manual"), learning_rate=0.01)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


# ---- basics/transformer.py ----------------------------------------------------------------------------------

class TinyTransformer(nn.Module):
    """Stands in for ``lightning.pytorch.demos.Transformer`` (same call: ``model(input, target)`` -> log-probs)."""

    def __init__(self, vocab_size: int, dim: int = 16) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, dim)
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(dim, 2, 32, batch_first=True), 1)
        self.decoder = nn.Linear(dim, vocab_size)

    def forward(self, inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        out = self.decoder(self.encoder(self.embedding(inputs) * math.sqrt(self.embedding.embedding_dim)))
        return F.log_softmax(out.view(-1, out.size(-1)), dim=-1)


class Tokens(Dataset):
    """Stands in for ``WikiText2``: (input, next-token target) windows of a synthetic token stream."""

    vocab_size = 50

    def __init__(self, n: int = 120, block: int = 8) -> None:
        self.data = torch.randint(0, self.vocab_size, (n + block + 1,), generator=torch.Generator().manual_seed(0))
        self.block, self.n = block, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        chunk = self.data[i:i + self.block + 1]
        return chunk[:-1], chunk[1:]


class LanguageModel(TrainModule):
    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.model = TinyTransformer(vocab_size=vocab_size)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        inputs, target = batch
        loss = F.nll_loss(self.model(inputs, target), target.view(-1))
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        inputs, target = batch
        loss = F.nll_loss(self.model(inputs, target), target.view(-1))
        self.log("val_loss", loss, prog_bar=True)
        return loss

    def test_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        inputs, target = batch
        loss = F.nll_loss(self.model(inputs, target), target.view(-1))
        self.log("test_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_transformer(tmp_path):
    pl.seed_everything(42)
    dataset = Tokens()
    n = len(dataset)
    train_dataset, val_dataset, test_dataset = random_split(dataset, [n - 40, 20, 20])
    train_dataloader = DataLoader(train_dataset, batch_size=20, shuffle=True)
    val_dataloader = DataLoader(val_dataset, batch_size=20, shuffle=False)
    test_dataloader = DataLoader(test_dataset, batch_size=20, shuffle=False)
    model = LanguageModel(vocab_size=dataset.vocab_size)
    trainer = Trainer(gradient_clip_val=0.25, max_epochs=2, default_root_dir=str(tmp_path), enable_progress_bar=False)
    trainer.fit(model, train_dataloader, val_dataloader)
    results = trainer.test(model, test_dataloader)
    assert trainer.global_step == 8 and math.isfinite(results[0]["test_loss"])


# ---- domain_templates/generative_adversarial_net.py ---------------------------------------------------------

class Generator(nn.Module):
    def __init__(self, latent_dim: int = 100, img_shape: tuple = (1, 28, 28)) -> None:
        super().__init__()
        self.img_shape = img_shape

        def block(in_feat: int, out_feat: int, normalize: bool = True) -> list[nn.Module]:
            layers: list[nn.Module] = [nn.Linear(in_feat, out_feat)]
            if normalize:
                layers.append(nn.BatchNorm1d(out_feat, 0.8))
            layers.append(nn.LeakyReLU(0.2, inplace=True))
            return layers

        self.model = nn.Sequential(*block(latent_dim, 32, normalize=False), *block(32, 64),
                                   nn.Linear(64, int(math.prod(img_shape))), nn.Tanh())

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        img = self.model(z)
        return img.view(img.size(0), *self.img_shape)


class Discriminator(nn.Module):
    def __init__(self, img_shape: tuple) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Linear(int(math.prod(img_shape)), 32), nn.LeakyReLU(0.2, inplace=True),
                                   nn.Linear(32, 1))

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return self.model(img.view(img.size(0), -1))


class GAN(TrainModule):
    def __init__(self, img_shape: tuple = (1, 28, 28), lr: float = 0.0002, b1: float = 0.5, b2: float = 0.999,
                 latent_dim: int = 100) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.generator = Generator(latent_dim=self.hparams.latent_dim, img_shape=img_shape)
        self.discriminator = Discriminator(img_shape=img_shape)
        self.validation_z = torch.randn(8, self.hparams.latent_dim)
        self.example_input_array = torch.zeros(2, self.hparams.latent_dim)
        self.images_logged = 0

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.generator(z)

    @staticmethod
    def adversarial_loss(y_hat: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(y_hat, y)

    def training_step(self, batch: Any) -> None:
        imgs, _ = batch
        opt_g, opt_d = self.optimizers()
        z = torch.randn(imgs.shape[0], self.hparams.latent_dim).type_as(imgs)
        valid = torch.ones(imgs.size(0), 1).type_as(imgs)
        self.toggle_optimizer(opt_g)
        g_loss = self.adversarial_loss(self.discriminator(self(z)), valid)
        opt_g.zero_grad()
        self.manual_backward(g_loss)
        opt_g.step()
        self.untoggle_optimizer(opt_g)
        self.toggle_optimizer(opt_d)
        real_loss = self.adversarial_loss(self.discriminator(imgs), valid)
        fake = torch.zeros(imgs.size(0), 1).type_as(imgs)
        fake_loss = self.adversarial_loss(self.discriminator(self(z).detach()), fake)
        d_loss = (real_loss + fake_loss) / 2
        opt_d.zero_grad()
        self.manual_backward(d_loss)
        opt_d.step()
        self.untoggle_optimizer(opt_d)
        self.log_dict({"d_loss": d_loss, "g_loss": g_loss})

    def configure_optimizers(self) -> Any:
        lr, b1, b2 = self.hparams.lr, self.hparams.b1, self.hparams.b2
        opt_g = torch.optim.Adam(self.generator.parameters(), lr=lr, betas=(b1, b2))
        opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=lr, betas=(b1, b2))
        return opt_g, opt_d

    def on_train_epoch_end(self) -> None:
        z = self.validation_z.type_as(self.generator.model[0].weight)
        if _TORCHVISION_AVAILABLE:
            import torchvision

            grid = torchvision.utils.make_grid(self(z))
        else:
            grid = self(z).reshape(8 * 28, 28).unsqueeze(0)
        for logger in self.loggers:
            logger.experiment.add_image("generated_images", grid, self.current_epoch)
            self.images_logged += 1


def test_generative_adversarial_net(tmp_path):
    pytest.importorskip("tensorboard")
    model = GAN(lr=0.0002, b1=0.5, b2=0.999, latent_dim=16)
    dm = MNISTDataModule()
    trainer = Trainer(accelerator="cpu", devices=1, max_epochs=1, default_root_dir=str(tmp_path), **FAST)
    trainer.fit(model, dm)
    assert trainer.global_step == 4 and model.images_logged == 1
    assert {"d_loss", "g_loss"} <= set(trainer.callback_metrics)
    assert os.listdir(trainer.logger.log_dir)


# ---- bug_report/bug_report_model.py ----------------------------------------------------------------------------

class RandomDataset(Dataset):
    def __init__(self, size: int, length: int) -> None:
        self.len = length
        self.data = torch.randn(length, size)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.data[index]

    def __len__(self) -> int:
        return self.len


class BoringModel(TrainModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(32, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        loss = self(batch).sum()
        self.log("train_loss", loss)
        return {"loss": loss}

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("valid_loss", self(batch).sum())

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.log("test_loss", self(batch).sum())

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.layer.parameters(), lr=0.1)


def test_bug_report_model(tmp_path):
    train_data = DataLoader(RandomDataset(32, 64), batch_size=2)
    val_data = DataLoader(RandomDataset(32, 64), batch_size=2)
    test_data = DataLoader(RandomDataset(32, 64), batch_size=2)
    model = BoringModel()
    trainer = Trainer(default_root_dir=str(tmp_path), limit_train_batches=1, limit_val_batches=1,
                      limit_test_batches=1, num_sanity_val_steps=0, max_epochs=1, enable_model_summary=False)
    trainer.fit(model, train_dataloaders=train_data, val_dataloaders=val_data)
    results = trainer.test(model, dataloaders=test_data)
    assert trainer.global_step == 1 and "test_loss" in results[0]
