"""Profiles: named sets of params.yaml values for a scale of run, written into params.yaml on request.

The committed params.yaml is the default profile (small but real, about 70 minutes on 2 CPU cores).
`profiles/<name>.yaml` holds the values another scale changes, nested like params.yaml:

- `smoke`: the whole DAG in minutes on 2 cores (one task, a few episodes, an epoch or two); the tests
  run it, and it proves the pipeline runs, not that it learns;
- `full`: the scale of the draft recipe (600 rollouts, 50 epochs, 50 trials a task), for a machine with a GPU and more cores.

`rsd profile NAME` writes those values into params.yaml in place (comments and order kept), so DVC sees
ordinary param changes and re-runs what they touch. Every profile sets the same keys, so going from
one profile to another in any order gives the same params; `git checkout params.yaml` returns to the
default.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import yaml

from rsd.io import atomic_path
from rsd.params import PARAMS_FILE

PROFILES_DIR = Path("profiles")


def _leaves(tree: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every non-mapping value; lists are values, not branches."""
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            yield from _leaves(value, f"{path}.")
        else:
            yield path, value


def available(profiles_dir: str | Path = PROFILES_DIR) -> list[str]:
    """Names of the profiles in `profiles_dir`."""
    return sorted(p.stem for p in Path(profiles_dir).glob("*.yaml"))


def load_profile(name: str, profiles_dir: str | Path = PROFILES_DIR) -> dict[str, Any]:
    """The values profile `name` sets, nested like params.yaml; a clear error for an unknown or malformed one."""
    path = Path(profiles_dir) / f"{name}.yaml"
    if not path.is_file():
        names = available(profiles_dir)
        raise FileNotFoundError(f"no profile {name!r}: {path} not found; profiles: {', '.join(names) or 'none'}")
    values = yaml.safe_load(path.read_text())
    if not isinstance(values, dict) or not values:
        raise ValueError(f"{path} must be a non-empty mapping of params.yaml sections, got {type(values).__name__}")
    bad = [section for section, body in values.items() if not isinstance(body, dict)]
    if bad:
        raise ValueError(f"{path}: section(s) {bad} must be mappings of keys to values (as in params.yaml)")
    return values


def check_profiles(profiles_dir: str | Path = PROFILES_DIR) -> dict[str, dict[str, Any]]:
    """Load every profile and refuse a set in which they do not all set the same keys, naming the gaps.

    Same keys in every profile is what makes switching between them independent of the order."""
    profiles = {name: load_profile(name, profiles_dir) for name in available(profiles_dir)}
    keys = {name: {k for k, _ in _leaves(values)} for name, values in profiles.items()}
    every = set().union(*keys.values()) if keys else set()
    gaps = [f"{name} lacks {', '.join(sorted(every - own))}" for name, own in keys.items() if every - own]
    if gaps:
        raise ValueError(f"profiles in {profiles_dir} must all set the same keys: " + "; ".join(gaps))
    return profiles


def _set(tree: Any, key: str, value: Any) -> Any:
    """Set dotted `key` in the round-trip YAML mapping `tree`, creating sections; return the old value."""
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    *parents, last = key.split(".")
    node = tree
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = CommentedMap()
        node = node[part]
    if isinstance(value, list):  # a list on one line, as params.yaml writes them
        value = CommentedSeq(value)
        value.fa.set_flow_style()
    old = node.get(last, "<unset>")
    node[last] = value
    return old


def _round_trip_yaml() -> Any:
    """ruamel.yaml (DVC's own YAML library) in round-trip mode: comments, order and quotes kept, None as `null`."""
    from ruamel.yaml import YAML

    rt = YAML()
    rt.preserve_quotes = True
    rt.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    return rt


def apply_profile(name: str, params_file: str | Path = PARAMS_FILE,
                  profiles_dir: str | Path = PROFILES_DIR) -> list[tuple[str, Any, Any]]:
    """Write profile `name`'s values into `params_file` (comments and order kept); return the changes
    as (dotted key, old value, new value), unchanged keys left out."""
    params_file = Path(params_file)
    if not params_file.is_file():
        raise FileNotFoundError(f"params file not found: {params_file}")
    load_profile(name, profiles_dir)  # an unknown name fails here, listing the profiles there are
    profile = check_profiles(profiles_dir)[name]
    rt = _round_trip_yaml()
    params = rt.load(params_file.read_text())
    if not isinstance(params, dict):
        raise ValueError(f"{params_file} must be a mapping of sections (base, sim, demos, ...)")
    changes = []
    for key, value in _leaves(profile):
        old = _set(params, key, value)
        if old != value:
            changes.append((key, old, value))
    with atomic_path(params_file) as tmp, open(tmp, "w") as f:
        rt.dump(params, f)
    return changes
