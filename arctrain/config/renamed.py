"""Config keys that moved: their old spelling still loads, as the new key, and the run says so once.

The QA keys were flat in `data` (`data.qa` the training files, `data.qa_val`, `data.qa_shots`, ...); they are the
section `data.qa` now (`data.qa.train`, `data.qa.val`, `data.qa.shots`, ...). Old run directories (config.yaml,
the fingerprint in trainer_state.json), configs and `key=value` overrides keep working.
"""

from arctrain.config.tree import ConfigError

# Old flat `data.qa_<name>` -> `data.qa.<name>`; `data.qa` itself (a string or a list) -> `data.qa.train`.
QA_FIELDS = ("val", "shots", "max_passages", "context", "context_tokens", "chat_template")
OLD_NAMES = [("data.qa", "data.qa.train")] + [(f"data.qa_{name}", f"data.qa.{name}") for name in QA_FIELDS]


def new_key(key: str) -> str | None:
    """The current dotted key of an old one (`data.qa_val` -> `data.qa.val`, `data.qa` and `data.qa.0` ->
    `data.qa.train`, `data.qa.train.0`), or None when `key` did not move. `data.qa` is read as the old key: the
    section itself is never given as one value."""
    parts = key.split(".")
    if len(parts) < 2 or parts[0] != "data":
        return None
    if parts[1] == "qa" and (len(parts) == 2 or parts[2].isdigit()):
        return ".".join(["data", "qa", "train", *parts[2:]])
    name = parts[1].removeprefix("qa_")
    if parts[1].startswith("qa_") and name in QA_FIELDS:
        return ".".join(["data", "qa", name, *parts[2:]])
    return None


def upgrade(raw: dict) -> list[tuple[str, str]]:
    """Move old keys of nested config data (a YAML file's) to their new place, in place; the (old, new) pairs
    moved. An old key beside its new one is an error: which one is meant is not clear."""
    data = raw.get("data")
    if not isinstance(data, dict):
        return []
    moved = []
    if "qa" in data and not isinstance(data["qa"], dict):  # the old string or list of training files
        data["qa"] = {"train": data["qa"]}
        moved.append(("data.qa", "data.qa.train"))
    for name in QA_FIELDS:
        old, new = f"qa_{name}", f"data.qa.{name}"
        if old in data:
            section = data.setdefault("qa", {})
            if name in section:
                raise ConfigError(f"data.{old}", f"is the old name of {new}, which is set too: keep {new}")
            section[name] = data.pop(old)
            moved.append((f"data.{old}", new))
    return moved


def note(moved: list[tuple[str, str]]) -> str:
    """The one line a run prints about old keys it read (`moved`: (old key, new key) pairs, in order)."""
    pairs = ", ".join(f"{old} -> {new}" for old, new in dict(moved).items())
    return f"config: old key names read as the new ones ({pairs}); write the new names"
