"""One small registry: components are chosen in recipes by name.

    @VISION_ENCODERS.register("my_cnn")
    class MyCNN(nn.Module): ...

A recipe then says ``model.vision.name: my_cnn`` and the remaining keys of that node become
keyword arguments. A component that declares a ``where: str`` parameter is given the recipe
path it is built at (``"model.vision"``), so its errors name the user's key wherever the
recipe puts it. A *prefix* entry (``timm:<model>``, ``hf:<config-or-dir>``) hands the part
after the colon to one factory, so any timm or transformers model is one word away.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from mmlightning.errors import UserError


def did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=3, cutoff=0.5)
    return f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


FRAMEWORK_ARGUMENTS = ("where",)  # given by Registry.build, never by a recipe


def check_kwargs(fn: Callable, kwargs: Mapping[str, Any], where: str) -> None:
    """Fail with the key's full path if ``kwargs`` holds a name ``fn`` does not take."""
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    valid = [n for n, p in params.items() if p.kind is not inspect.Parameter.VAR_POSITIONAL
             and n not in FRAMEWORK_ARGUMENTS]
    for key in kwargs:
        if key not in valid:
            raise UserError(
                f"{where}.{key}: unknown option for {getattr(fn, '__qualname__', fn)}."
                f"{did_you_mean(key, valid)} Valid options: {', '.join(sorted(valid)) or '(none)'}."
            )


class Registry:
    """Maps names to classes or factory functions of one kind of component."""

    def __init__(self, kind: str, key: str) -> None:
        self.kind = kind
        self.key = key  # where a recipe names one, e.g. "model.vision.name"
        self._entries: dict[str, Callable[..., Any]] = {}
        self._prefixes: dict[str, Callable[..., Any]] = {}

    def register(self, name: str) -> Callable[[Callable], Callable]:
        """Decorator: ``@REG.register("name")``. A name ending in ':' registers a prefix
        factory, called as ``factory(rest_of_name, **kwargs)``."""

        def add(obj: Callable) -> Callable:
            table = self._prefixes if name.endswith(":") else self._entries
            key = name.rstrip(":")
            old = table.get(key)
            reloaded = old is not None and (getattr(old, "__module__", None), getattr(old, "__qualname__", None)) == (
                getattr(obj, "__module__", None), getattr(obj, "__qualname__", None))
            if old is not None and old is not obj and not reloaded:  # a re-imported module may replace itself
                raise ValueError(f"{self.kind} {name!r} is already registered by {old}")
            table[key] = obj
            return obj

        return add

    def names(self) -> list[str]:
        return sorted(self._entries) + [f"{p}:<name>" for p in sorted(self._prefixes)]

    def entries(self) -> list[tuple[str, Callable[..., Any]]]:
        """(name, class or factory) for every name, as ``names()`` spells them."""
        return [(n, self._entries[n]) for n in sorted(self._entries)] + [
            (f"{p}:<name>", self._prefixes[p]) for p in sorted(self._prefixes)]

    def get(self, name: str, where: str = "") -> Callable[..., Any]:
        if name in self._entries:
            return self._entries[name]
        prefix, sep, _ = name.partition(":")
        if sep and prefix in self._prefixes:
            return self._prefixes[prefix]
        where = f"{where}: " if where else ""
        raise UserError(
            f"{where}unknown {self.kind} {name!r}.{did_you_mean(name, list(self._entries))} "
            f"Valid names: {', '.join(self.names())}. Register your own with "
            f"@mmlightning.registry.{registry_variable(self)}.register('name') in a module "
            f"listed under `imports:`."
        )

    def check(self, spec: Mapping[str, Any], where: str) -> None:
        """Fail now, before any training, on an unknown name or keyword argument."""
        if "name" not in spec:
            raise UserError(f"{where}: missing 'name'. Valid names: {', '.join(self.names())}.")
        fn = self.get(str(spec["name"]), where=f"{where}.name")
        check_kwargs(fn, {k: v for k, v in spec.items() if k != "name"}, where)

    def build(self, spec: Mapping[str, Any], where: str = "", **extra: Any) -> Any:
        """Build from ``{"name": ..., **kwargs}``; ``extra`` are arguments the framework
        supplies (e.g. a tokenizer), not the recipe."""
        self.check(spec, where)
        name = str(spec["name"])
        kwargs = {k: v for k, v in spec.items() if k != "name"}
        taken = sorted(set(kwargs) & set(extra))
        if taken:
            raise UserError(f"{where}.{taken[0]}: set by the framework, not the recipe (from the task's towers and "
                            f"the run's seed); remove it.")
        fn = self.get(name)
        if "where" in inspect.signature(fn).parameters:
            extra = {**extra, "where": where}
        if name in self._entries:
            return fn(**kwargs, **extra)
        return fn(name.partition(":")[2], **kwargs, **extra)

    def __contains__(self, name: str) -> bool:
        prefix, sep, _ = name.partition(":")
        return name in self._entries or (bool(sep) and prefix in self._prefixes)


def registry_variable(reg: Registry) -> str:
    for var, value in globals().items():
        if value is reg:
            return var
    return "Registry"


VISION_ENCODERS = Registry("vision encoder", "model.vision.name")
TEXT_ENCODERS = Registry("text encoder", "model.text.name")
TEXT_DECODERS = Registry("text decoder", "model.decoder.name")
LANGUAGE_MODELS = Registry("language model", "model.lm.name")  # causal LMs read image tokens as a prefix (vlm)
PROJECTIONS = Registry("projection head", "model.projection.name")
TEMPORAL_AGGREGATORS = Registry("temporal aggregation", "model.temporal.name")  # frame embeddings -> a video's
FUSION_HEADS = Registry("fusion head", "model.fusion.name")
PROMPT_LEARNERS = Registry("prompt learner", "model.prompt.name")  # learned text prompts on a frozen CLIP (CoOp)
LOSSES = Registry("loss", "loss.name")
DATA_MODULES = Registry("data module", "data.name")
TASKS = Registry("task", "task")
OPTIMIZERS = Registry("optimizer", "optimizer.name")
SCHEDULERS = Registry("lr schedule", "scheduler.name")
PRETRAINED_CLIPS = Registry("pretrained CLIP", "model.pretrained")  # whole dual encoders: towers, projections, scale
WEIGHT_REMAPS = Registry("weight remap", "model.vision.checkpoint_remap")
VOCABULARIES = Registry("word vocabulary", "model.text.vocab")  # closed word lists for word-level tokenizers


def all_registries() -> list[Registry]:
    """Every kind of component, in the order the docs list them."""
    return [VISION_ENCODERS, TEXT_ENCODERS, TEXT_DECODERS, LANGUAGE_MODELS, PROJECTIONS, TEMPORAL_AGGREGATORS, FUSION_HEADS, PROMPT_LEARNERS, LOSSES, DATA_MODULES, TASKS,
            OPTIMIZERS, SCHEDULERS, PRETRAINED_CLIPS, WEIGHT_REMAPS, VOCABULARIES]
