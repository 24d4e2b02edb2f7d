"""One base for every yoco error: the command line catches it alone and prints one line."""

import importlib
import inspect
import pkgutil

import pytest

import yoco
from yoco import YocoError
from yoco.cli import main

# Each error keeps the builtin it always derived from, so `except ValueError` around yoco calls still works.
BUILTIN_BASES = {"ConfigError": ValueError, "InputError": ValueError, "DataError": ValueError, "BenchError": ValueError,
                 "BudgetError": ValueError, "UsageError": ValueError, "CheckpointError": RuntimeError,
                 "CacheError": RuntimeError}


def error_classes() -> dict[str, type]:
    """Every exception class defined in a module of the package, by qualified name."""
    found = {}
    for module_info in pkgutil.walk_packages(yoco.__path__, "yoco."):
        module = importlib.import_module(module_info.name)
        for name, value in vars(module).items():
            if inspect.isclass(value) and issubclass(value, BaseException) and value.__module__ == module.__name__:
                found[f"{module.__name__}.{name}"] = value
    return found


def test_every_error_class_of_the_package_derives_from_yoco_error():
    classes = error_classes()
    assert set(BUILTIN_BASES) <= {cls.__name__ for cls in classes.values()}, sorted(classes)
    outside = sorted(name for name, cls in classes.items() if cls is not YocoError and not issubclass(cls, YocoError))
    assert not outside, f"error classes that `yoco` would not catch: {outside}"
    for cls in classes.values():
        if cls.__name__ in BUILTIN_BASES:
            assert issubclass(cls, BUILTIN_BASES[cls.__name__]), cls


class Unforeseen(YocoError):
    """A yoco error no command names: main() must catch it through the base alone."""


def test_main_turns_any_yoco_error_into_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    import yoco.commands.init

    def fail(args):
        raise Unforeseen("the model folder is on fire")

    monkeypatch.setattr(yoco.commands.init, "run", fail)
    assert main(["init", "--arch", "mha", "--out", str(tmp_path / "m")]) == 2
    captured = capsys.readouterr()
    assert captured.err == "yoco init: error: the model folder is on fire\n" and captured.out == ""


def test_main_lets_a_bug_through_with_its_traceback(tmp_path, monkeypatch):
    import yoco.commands.init

    def bug(args):
        raise KeyError("not a user error")

    monkeypatch.setattr(yoco.commands.init, "run", bug)
    with pytest.raises(KeyError):
        main(["init", "--arch", "mha", "--out", str(tmp_path / "m")])
