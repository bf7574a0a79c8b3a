"""Is a dataset complete and valid? `verify_dataset` runs every check and reports each one.

Checks, in order: the files are there (one complete layout), the known sha256 values match (see
registry.py for what they cover; CIFAR-10's official md5 is only reported, since a re-packed copy
is valid too), the loader reads everything without error, and the sizes match the registry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from moe_apps.datasets.errors import DatasetError
from moe_apps.datasets.files import complete_file_set, file_digest, missing_files
from moe_apps.datasets.paths import resolve_data_root
from moe_apps.datasets.registry import CIFAR10_OFFICIAL_MD5, CIFAR10_TARBALL, get_spec


@dataclass(frozen=True)
class Check:
    """One verification step: `ok` False means the dataset is not usable as is."""

    name: str
    ok: bool
    detail: str


@dataclass
class VerifyReport:
    """All checks of one dataset under `root`; `ok` when every check passed."""

    name: str
    root: Path
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(check.ok for check in self.checks)


def verify_dataset(name: str, root: str | Path | None = None, *, checksums: bool = True,
                   counts: bool = True) -> VerifyReport:
    """Verify dataset `name` under the data root; never raises for a bad dataset, reports it.

    `checksums=False` skips hashing; `counts=False` skips comparing sizes with the registry (for
    a deliberately small copy).
    """
    spec = get_spec(name)
    data_root = resolve_data_root(root)
    report = VerifyReport(name, data_root)
    found = complete_file_set(spec, data_root)
    if found is None:
        missing = missing_files(spec, data_root)
        report.checks.append(Check("files", False, f"{len(missing)} missing under "
                                   f"{data_root / spec.folder}: {', '.join(missing[:4])}"))
        return report
    optional = [f for f in spec.optional_files if (data_root / f).is_file()]
    report.checks.append(Check("files", True, f"{len(found)} files" + (
        f" + {len(optional)} optional" if optional else "")))

    if checksums:
        report.checks.extend(_checksum_checks(spec.sha256, data_root, set(found) | set(optional)))
        if name == "cifar10" and (data_root / CIFAR10_TARBALL).is_file():
            md5 = file_digest(data_root / CIFAR10_TARBALL, "md5")
            note = ("the official tarball" if md5 == CIFAR10_OFFICIAL_MD5 else
                    f"not the official {CIFAR10_OFFICIAL_MD5} (a re-packed copy: checked by "
                    "contents below)")
            report.checks.append(Check("md5 (informational)", True, f"{md5}: {note}"))

    try:
        sizes = _load_sizes(name, data_root)
    except DatasetError as error:
        report.checks.append(Check("load", False, str(error)))
        return report
    shown = list(sizes.items())[:3]
    more = f" (+{len(sizes) - 3} more)" if len(sizes) > 3 else ""
    report.checks.append(Check("load", True, ", ".join(f"{k} {v:,}" for k, v in shown) + more))
    expected = {key: want for key, want in spec.counts.items() if key in sizes}
    if counts and expected:
        wrong = [f"{key} {sizes[key]:,} (expected {want:,})" for key, want in expected.items()
                 if sizes[key] != want]
        report.checks.append(Check("counts", not wrong, "; ".join(wrong) if wrong else
                                   f"{len(expected)} sizes as in the registry"))
    return report


def _checksum_checks(known: dict[str, str], root: Path, present: set[str]) -> list[Check]:
    checks = []
    bad = []
    checked = 0
    for relative, want in known.items():
        if relative not in present:
            continue
        got = file_digest(root / relative)
        checked += 1
        if got != want:
            bad.append(f"{relative} is {got[:12]}..., expected {want[:12]}...")
    if checked:
        checks.append(Check("sha256", not bad, "; ".join(bad) if bad else
                            f"{checked} files match the registry"))
    return checks


def _load_sizes(name: str, root: Path) -> dict[str, int]:
    """Load the dataset with its loader and return its sizes under the registry's count keys."""
    if name.startswith("movielens"):
        from moe_apps.datasets.movielens import load_movielens

        data = load_movielens(name, root)
        sizes = {"ratings": len(data.ratings), "users": len(data.users), "items": len(data.items)}
        for fold, (train, test) in data.folds.items():
            sizes[f"{fold} train"] = len(train)
            sizes[f"{fold} test"] = len(test)
        return sizes
    if name == "cifar10":
        import numpy as np

        from moe_apps.datasets.cifar10 import load_cifar10

        cifar = load_cifar10(root)
        train = np.bincount(cifar.train_labels.numpy(), minlength=10)
        test = np.bincount(cifar.test_labels.numpy(), minlength=10)
        # With the totals right, "smallest class has N/10 images" means every class has N/10.
        return {"train": len(cifar.train_labels), "test": len(cifar.test_labels),
                "train_per_class": int(train.min()), "test_per_class": int(test.min())}
    from moe_apps.datasets.multi30k import load_multi30k

    return {split: len(pairs) for split, pairs in load_multi30k(root).items()}
