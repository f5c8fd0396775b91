"""Components by name: swaps by one override, clear errors, user components from a module."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny import SHAPES_CLIP

from mmlightning.build import build_task
from mmlightning.cli import main
from mmlightning.config import load_recipe, resolve
from mmlightning.errors import UserError
from mmlightning.encoders.tokenizers import tokenize


def task_for(*overrides: str):
    return build_task(resolve(load_recipe("clip-shapes", list(overrides))))


@pytest.mark.parametrize("override, message", [
    ("model.vision.name=shapes_cn", "model.vision.name: unknown vision encoder 'shapes_cn'. Did you mean 'shapes_cnn'"),
    ("model.vision.widht=8", "model.vision.widht: unknown option for SmallCNN. Did you mean 'width'"),
    ("loss.name=clipp", "loss.name: unknown loss 'clipp'. Did you mean 'clip'"),
    ("optimizer.name=adamw2", "unknown optimizer 'adamw2'"),
    ("model.vision.name=timm:vit_tiny_patch16_22", "timm has no model 'vit_tiny_patch16_22'. Did you mean 'vit_tiny_patch16_224'"),
    ("model.text.name=hf:/no/such/dir", "model.text.name: '/no/such/dir': no such directory"),
    ("task=clips", "task: unknown task 'clips'. Did you mean 'clip'"),
])
def test_unknown_names_list_the_choices(override: str, message: str) -> None:
    with pytest.raises(UserError) as err:
        task_for(override)
    assert message in str(err.value)


def test_unknown_name_lists_valid_names() -> None:
    # other tests in this process may have registered their own encoders: list order is sorted
    with pytest.raises(UserError, match=r"Valid names: ([a-z_]+, )*shapes_cnn, hf_clip_vision:<name>, open_clip_vision:<name>, timm:<name>"):
        task_for("model.vision.name=nothing")


def test_timm_and_hf_towers_by_one_override(minilm_dir: Path) -> None:
    import torch

    task = task_for("model.vision.name=timm:resnet18", "model.vision.img_size=64",
                    f"model.text.name=hf:{minilm_dir}", "model.text.pretrained=false",
                    "model.text.config={num_hidden_layers: 1}")
    assert task.vision.output_dim == 512 and task.text.output_dim == 384
    tokens = task.text.tokenizer(["a small red circle"], return_tensors="pt")
    image = task.encode_image(torch.randn(2, 3, 64, 64))
    text = task.encode_text(tokens["input_ids"], tokens["attention_mask"])
    assert image.shape == (2, 128) and text.shape == (1, 128)
    # every parameter takes part in the loss: DDP (without find_unused_parameters) requires it
    tokens = task.text.tokenizer(["a small red circle", "a large blue square"], return_tensors="pt", padding=True)
    text = task.encode_text(tokens["input_ids"], tokens["attention_mask"])
    task.loss_fn(image, text, task.temperature_scale()).backward()
    assert [n for n, p in task.named_parameters() if p.grad is None] == []


def test_user_component_from_own_module(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "my_towers.py").write_text('''
import torch
from torch import nn
from mmlightning.encoders import ImageConfig, VisionOutput
from mmlightning.registry import VISION_ENCODERS

@VISION_ENCODERS.register("tiny_mlp")
class TinyMLP(nn.Module):
    def __init__(self, image_size: int = 64, hidden: int = 32):
        super().__init__()
        self.image_config = ImageConfig(size=image_size)
        self.output_dim = self.token_dim = hidden
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * image_size * image_size, hidden))

    def forward(self, images):
        pooled = self.net(images)
        return VisionOutput(pooled=pooled, tokens=pooled[:, None])
''')
    assert main(["check", "clip-shapes", *SHAPES_CLIP, "imports=[my_towers.py]", "model.vision.name=tiny_mlp",
                 "model.vision.hidden=16"]) == 0
    assert "ok:" in capsys.readouterr().out
    assert main(["check", "clip-shapes", *SHAPES_CLIP, "imports=[not_a_module]"]) == 2
    assert "imports: cannot import 'not_a_module'" in capsys.readouterr().err


def test_siglip_by_one_override() -> None:
    task = task_for("loss.name=siglip")
    assert task.logit_bias is not None and float(task.logit_bias) == -10.0


def test_adamw_fused_by_default_and_same_updates_as_torch_loop() -> None:
    import torch

    from mmlightning.registry import OPTIMIZERS

    def trained(fused: bool | None) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 2))
        optimizer = OPTIMIZERS.build({"name": "adamw", "lr": 1e-2, "fused": fused}, "optimizer",
                                     params=[{"params": list(model.parameters())}])
        for step in range(5):
            x = torch.randn(32, 8, generator=torch.Generator().manual_seed(step))
            optimizer.zero_grad()
            model(x).square().mean().backward()
            optimizer.step()
        return model, optimizer

    fused_model, fused_optimizer = trained(None)
    loop_model, loop_optimizer = trained(False)
    assert fused_optimizer.defaults["fused"] is True and not loop_optimizer.defaults["fused"]
    for a, b in zip(fused_model.parameters(), loop_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_compile_flag_keeps_checkpoint_keys_and_results(tmp_path: Path) -> None:
    """``compile: true`` compiles the trainable parts in place: same state-dict keys, same
    loss. (The aot_eager backend here: the default inductor needs a C++ toolchain and
    minutes on this CPU; on a GPU leave compile_options empty.)"""
    import torch

    from mmlightning.build import build_datamodule, build_task
    from mmlightning.config import load_recipe, resolve

    def loss_and_keys(*extra: str):
        cfg = resolve(load_recipe("clip-shapes", [*SHAPES_CLIP, *extra]))
        torch.manual_seed(0)
        task = build_task(cfg)
        datamodule = build_datamodule(cfg, task)
        datamodule.setup("fit")
        batch = next(iter(datamodule.train_dataloader()))
        return task.batch_loss(batch), list(task.state_dict()), task

    eager_loss, eager_keys, _ = loss_and_keys()
    compiled_loss, compiled_keys, task = loss_and_keys("compile=true", "compile_options={backend: aot_eager}")
    assert compiled_keys == eager_keys
    assert task.vision._compiled_call_impl is not None and task.loss_fn._compiled_call_impl is None
    torch.testing.assert_close(compiled_loss, eager_loss, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("towers", ["timm+hf", "open_clip"])
def test_gradient_checkpointing_gives_the_same_gradients(towers: str, minilm_dir: Path,
                                                         pretrained_clips: dict[str, Path]) -> None:
    import torch

    def gradients(checkpointing: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        flag = str(checkpointing).lower()
        if towers == "open_clip":
            # both towers from the source, with its projections: no fresh layer whose initial
            # weights would depend on what the first build drew
            overrides = [f"+model.pretrained=open_clip:local-dir:{pretrained_clips['open_clip']}",
                         f"model.vision={{grad_checkpointing: {flag}}}", f"model.text={{grad_checkpointing: {flag}}}",
                         "model.embed_dim=null"]
        else:
            overrides = ["model.vision.name=timm:vit_base_patch16_224", "model.vision.img_size=32",
                         "model.vision.model_kwargs={depth: 2, embed_dim: 32, num_heads: 2}",
                         f"model.vision.grad_checkpointing={flag}",
                         f"model.text.name=hf:{minilm_dir}", "model.text.pretrained=false",
                         "model.text.config={num_hidden_layers: 2, hidden_size: 32, num_attention_heads: 2, "
                         f"intermediate_size: 64}}", f"+model.text.grad_checkpointing={flag}"]
        task = task_for(*overrides)
        task.train()
        size = task.data_spec().image_config.size
        tokens = tokenize(task.text.tokenizer, ["a small red circle", "a large blue square"], task.text.max_length)
        image = task.encode_image(torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1)))
        text = task.encode_text(tokens["input_ids"], tokens["attention_mask"])
        task.loss_fn(image, text, task.temperature_scale()).backward()
        return {n: p.grad.clone() for n, p in task.named_parameters() if p.grad is not None}

    plain, checkpointed = gradients(False), gradients(True)
    assert plain.keys() == checkpointed.keys() and len(plain) > 20
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_every_prefix_factory_defaults_to_fresh_weights() -> None:
    """Changing a tower's name never starts a download: ``pretrained`` is off unless asked."""
    import inspect

    from mmlightning.build import import_components
    from mmlightning.registry import TEXT_DECODERS, TEXT_ENCODERS, VISION_ENCODERS

    import_components()
    checked = []
    for registry in (VISION_ENCODERS, TEXT_ENCODERS, TEXT_DECODERS):
        for prefix, factory in registry._prefixes.items():
            parameter = inspect.signature(factory).parameters.get("pretrained")
            if parameter is not None:
                checked.append(f"{registry.kind} {prefix}:")
                assert parameter.default is False, f"{registry.kind} {prefix}: defaults to pretrained={parameter.default}"
    assert len(checked) >= 3  # timm:, hf: text, hf: decoder


def test_components_name_the_recipe_key_they_are_built_at() -> None:
    from mmlightning.build import import_components
    from mmlightning.registry import VISION_ENCODERS

    import_components()
    with pytest.raises(UserError, match=r"^model\.fusion_side\.name: timm has no model 'resnet_nope'"):
        VISION_ENCODERS.build({"name": "timm:resnet_nope"}, "model.fusion_side")
    with pytest.raises(UserError, match=r"model\.vision\.where: unknown option"):
        VISION_ENCODERS.build({"name": "timm:resnet18", "where": "x"}, "model.vision")


def test_predict_runs_where_the_recipe_accelerator_says() -> None:
    import torch

    from mmlightning.build import inference_device

    assert inference_device({"accelerator": "cpu"}).type == "cpu"
    expected = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")  # a GPU where there is one
    assert inference_device({"accelerator": "auto"}) == expected
