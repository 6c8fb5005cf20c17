"""The shipped reference cases: intact (manifest hashes), complete (tags,
tolerances with reasons, versions), and reproduced by the current code
within every stated tolerance, so that a change of the math that moves a
golden value fails here."""

import copy
import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from mrc_ref import cases, compensate, testing
from mrc_ref.cases import __main__ as cases_cli
from mrc_ref.cases import compare, generate, reference
from mrc_ref.errors import MrcError, UnsupportedVersion

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VERSIONS = cases.versions()
LATEST = VERSIONS[-1]
IDS = cases.case_ids()
#: Every shipped case of every version, as (version, id).
ALL = [(version, case_id) for version in VERSIONS for case_id in cases.case_ids(version)]
#: The situations the kit promises (docs/testing.md): one case at least carries each tag.
REQUIRED_TAGS = {"well-conditioned", "rank-deficient-c", "dead-input-channels", "near-tie", "float32-stats",
                 "tall", "wide", "tiny", "vit", "end-to-end"}


@pytest.fixture(scope="module")
def loaded():
    """Every case of every version, keyed by (version, id); the latest also by id."""
    everything = {(version, case_id): testing.load_case(case_id, version) for version, case_id in ALL}
    everything.update({case_id: everything[LATEST, case_id] for case_id in IDS})
    return everything


def test_versions_v1_and_v2_are_shipped_and_the_latest_is_the_default():
    assert VERSIONS[:2] == ["v1", "v2"] and cases.resolve_version() == LATEST
    assert [(c["version"], c["id"]) for c in testing.iter_cases(tags="tiny")] == [(LATEST, "tiny-1xn")]
    assert set(cases.case_ids("v1")) == set(cases.case_ids("v2"))


@pytest.mark.parametrize("version,case_id", ALL)
def test_every_case_matches_its_manifest(version, case_id):
    directory = cases.case_dir(case_id, version)
    assert cases.check_files(directory) == [], case_id
    manifest = cases.read_manifest(directory)
    for name in cases.CASE_FILES:  # an independent hash of the bytes
        with open(os.path.join(directory, name), "rb") as fh:
            assert hashlib.sha256(fh.read()).hexdigest() == manifest["files"][name]["sha256"], (case_id, name)


def test_manifests_state_versions_tags_and_a_reasoned_tolerance_per_quantity(loaded):
    seen = set()
    for (version, case_id), case in ((k, v) for k, v in loaded.items() if isinstance(k, tuple)):
        m = case["manifest"]
        assert m["schema_version"] == (1 if version == "v1" else cases.SCHEMA_VERSION)
        assert m["id"] == case_id and m["version"] == version
        assert {"numpy", "scipy", "mrc_ref"} <= set(m["generated_by"])
        assert m["difficulty"] in ("lower", "average", "higher") and m["description"]
        quantities = {q for q, *_ in compare.items(case["expected"])}
        assert quantities <= set(m["tolerances"]), (case_id, quantities - set(m["tolerances"]))
        for quantity, tol in m["tolerances"].items():
            assert tol["kind"] in ("exact", "scalar", "array", "product") and len(tol["reason"]) > 10, quantity
        seen |= set(m["tags"])
    assert REQUIRED_TAGS <= seen, REQUIRED_TAGS - seen


def test_the_cases_cover_what_the_tags_claim(loaded):
    shapes = [lay["shape"] for c in loaded.values() for lay in c["layers"].values()]
    assert any(m > n for m, n in shapes) and any(m < n for m, n in shapes) and (1, 32) in shapes
    deficient = loaded["rank-deficient-c"]["layers"]["layers.0"]
    assert np.linalg.matrix_rank(deficient["C"]) == deficient["stats"]["rows"] < deficient["shape"][1]
    dead = loaded["dead-channels"]["layers"]["layers.0"]
    assert np.all(dead["C"][:, [3, 17, 18, 39]] == 0) and np.all(dead["W"][:, [3, 17, 18, 39]] != 0)
    assert loaded["float32-stats"]["layers"]["layers.0"]["stats"]["gram"].dtype == np.float32
    tie = loaded["near-tie"]["layers"]["layers.0"]["expected"]
    assert tie["stage1"][6]["eigen_gap"] < 1e-10 and tie["stage1"][6]["product"] is None
    assert tie["stage1"][5]["product"] is not None and tie["stage1"][7]["product"] is not None
    assert "residual_product" in tie["compressed"]["omitted"]
    vit = loaded["vit-example"]
    assert vit["tokens"].shape == (64, 17, 64) and vit["expected"]["logits"]["compressed"].shape == (64, 10)
    for case in (c for k, c in loaded.items() if isinstance(k, tuple) and "rank-deficient-c" in c["tags"]):
        assert any(np.linalg.matrix_rank(lay["C"]) < lay["shape"][1] for lay in case["layers"].values()), case["id"]
    qkv = vit["layers"]["blocks.0.attn.qkv"]  # LayerNorm of tokens spanned by 16 grey levels + 17 positions
    assert qkv["stats"]["gram"].dtype == np.float64 and np.linalg.matrix_rank(qkv["C"]) == 34
    assert qkv["stats"]["rows"] == 300 * 17


@pytest.mark.parametrize("version", VERSIONS)
def test_total_size_is_about_five_megabytes(version):
    total = sum(cases.case_bytes(cases.case_dir(c, version)) for c in cases.case_ids(version))
    assert 2e6 < total < 6e6


@pytest.mark.parametrize("version,case_id", ALL)
def test_current_code_reproduces_every_expected_value(version, case_id, loaded):
    assert reference.reproduce(loaded[version, case_id]) == []


def gram_problem(C):
    """None when a stored Gram is exactly symmetric and positive
    semi-definite to float64 round-off (λ_min ≥ −n ε λ_max), else why not."""
    C = np.asarray(C, dtype=np.float64)
    if not np.array_equal(C, C.T):
        return "not exactly symmetric"
    lam = np.linalg.eigvalsh(C)
    floor = -C.shape[0] * np.finfo(np.float64).eps * lam[-1]
    return None if lam[0] >= floor else f"indefinite: λ_min {lam[0]:.3g}, λ_max {lam[-1]:.3g}"


def test_every_stored_gram_is_symmetric_positive_semi_definite(loaded):
    """Issue 17, item 2: v2 stores every Gram exactly symmetric and PSD to
    round-off; v1's erratum is the one of vit-example's blocks.0.attn.qkv
    (float32 rounding of a rank-34 Gram: λ_min −5.7e-4 for λ_max 9.2e4)."""
    bad = {(version, case_id, name): gram_problem(layer["stats"]["gram"])
           for (version, case_id) in ALL for name, layer in loaded[version, case_id]["layers"].items()}
    bad = {k: v for k, v in bad.items() if v}
    assert list(bad) == [("v1", "vit-example", "blocks.0.attn.qkv")], bad
    assert "λ_min -0.000574" in bad["v1", "vit-example", "blocks.0.attn.qkv"]
    with pytest.raises(MrcError, match="layer blocks.0.attn.qkv: the stored Gram is indefinite"):
        generate.check_grams("vit-example", {name: layer["stats"]
                                             for name, layer in loaded["v1", "vit-example"]["layers"].items()})


def test_a_change_of_the_math_fails_the_reproduction(loaded, monkeypatch):
    """A 1 % larger damping moves the Stage-3 losses and residuals."""
    damping = compensate.damping
    monkeypatch.setattr(compensate, "damping", lambda Ct, damp: 1.01 * damping(Ct, damp))
    failures = reference.reproduce(loaded["well-conditioned"])
    assert any("layer layers.0" in f and "losses (loss_stage3)" in f for f in failures), failures
    assert any("residual_product" in f for f in failures), failures


def test_a_moved_expected_value_is_named(loaded):
    case = loaded["well-conditioned"]
    layer = case["expected"]["layers"]["layers.1"]
    moved = copy.deepcopy(case["expected"])
    moved["layers"]["layers.1"]["compressed"]["nmse_stage3"] = layer["compressed"]["nmse_stage3"] * (1 + 1e-6)
    failures = [f for f in compare.compare(case["expected"], moved, case) if "layers.1" in f]
    assert len(failures) == 1 and "losses (nmse_stage3)" in failures[0] and "rtol=1e-08" in failures[0]


def test_a_changed_file_is_refused(tmp_path):
    copy = tmp_path / "case"
    shutil.copytree(cases.case_dir("tiny-1xn"), copy)
    testing.load_case(str(copy))
    data = bytearray((copy / "acts.h5").read_bytes())
    data[-1] ^= 1
    (copy / "acts.h5").write_bytes(bytes(data))
    with pytest.raises(MrcError, match="acts.h5: SHA-256 differs from the manifest"):
        testing.load_case(str(copy))
    shutil.copy(os.path.join(cases.case_dir("tiny-1xn"), "acts.h5"), copy / "acts.h5")
    (copy / "notes.txt").write_text("x")
    with pytest.raises(MrcError, match="notes.txt: not a file of the case"):
        testing.load_case(str(copy))


MANIFEST_CORRUPTIONS = {
    "a list": lambda m: [m],
    "a string": lambda m: "MANIFEST",
    "null": lambda m: None,
    "an entry without bytes": lambda m: {**m, "files": {**m["files"], "acts.h5": {"sha256": "0" * 64}}},
    "an entry without sha256": lambda m: {**m, "files": {**m["files"], "acts.h5": {"bytes": 10}}},
    "bytes as a string": lambda m: {**m, "files": {**m["files"], "acts.h5": {**m["files"]["acts.h5"], "bytes": "10"}}},
    "bytes as a boolean": lambda m: {**m, "files": {**m["files"], "acts.h5": {**m["files"]["acts.h5"], "bytes": True}}},
    "a non-hex sha256": lambda m: {**m, "files": {**m["files"], "acts.h5": {**m["files"]["acts.h5"], "sha256": "xyz"}}},
    "an entry that is a list": lambda m: {**m, "files": {**m["files"], "acts.h5": [1, 2]}},
    "files as a list": lambda m: {**m, "files": list(m["files"])},
    "no files": lambda m: {k: v for k, v in m.items() if k != "files"},
    "a file outside the case": lambda m: {**m, "files": {**m["files"], "../acts.h5": m["files"]["acts.h5"]}},
    "an unknown schema": lambda m: {**m, "schema_version": 99},
    "a schema as a string": lambda m: {**m, "schema_version": "1"},
    "no id": lambda m: {k: v for k, v in m.items() if k != "id"},
    "tags as a string": lambda m: {**m, "tags": "tiny"},
    "a version that is not v<n>": lambda m: {**m, "version": "latest"},
    "tolerances as a list": lambda m: {**m, "tolerances": []},
    "a tolerance of unknown kind": lambda m: {**m, "tolerances": {**m["tolerances"], "spectrum": {"kind": "fuzzy",
                                                                                                  "reason": "x"}}},
    "a negative rtol": lambda m: {**m, "tolerances": {**m["tolerances"],
                                                      "spectrum": {**m["tolerances"]["spectrum"], "rtol": -1}}},
    "an rtol as a string": lambda m: {**m, "tolerances": {**m["tolerances"], "spectrum": {
        **m["tolerances"]["spectrum"], "rtol": "1e-10"}}},
    "a tolerance without reason": lambda m: {**m, "tolerances": {**m["tolerances"], "shape": {"kind": "exact"}}},
}


@pytest.mark.parametrize("corruption", list(MANIFEST_CORRUPTIONS))
def test_a_malformed_manifest_is_an_error_naming_the_file(tmp_path, corruption):
    """Issue 16, item 5: load_case on a manifest of the wrong structure
    raises MrcError naming MANIFEST.json, never AttributeError or KeyError."""
    case = tmp_path / "case"
    shutil.copytree(cases.case_dir("tiny-1xn"), case)
    manifest = json.loads((case / cases.MANIFEST).read_text(encoding="utf-8"))
    (case / cases.MANIFEST).write_text(json.dumps(MANIFEST_CORRUPTIONS[corruption](manifest)), encoding="utf-8")
    with pytest.raises(MrcError) as info:
        testing.load_case(str(case))
    message = str(info.value)
    assert message.startswith(str(case / cases.MANIFEST) + ": ") and "\n" not in message, message
    if corruption == "an unknown schema":
        assert isinstance(info.value, UnsupportedVersion) and "schema_version 99" in message


def _case_with(tmp_path, name, text):
    """A copy of tiny-1xn whose ``name`` holds ``text``, its manifest updated
    to match (so only the content is wrong)."""
    case = tmp_path / "case"
    shutil.copytree(cases.case_dir("tiny-1xn"), case)
    blob = text.encode("utf-8")
    (case / name).write_bytes(blob)
    manifest = json.loads((case / cases.MANIFEST).read_text(encoding="utf-8"))
    manifest["files"][name] = {"sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob)}
    (case / cases.MANIFEST).write_text(json.dumps(manifest), encoding="utf-8")
    return case


@pytest.mark.parametrize("text, words", [("[]", "the configuration is not a JSON object"),
                                         ('{"reduction": "half"}', "reduction must be a number")])
def test_a_bad_case_config_is_an_error_naming_config_json(tmp_path, text, words):
    """A consistent manifest over a bad
    config.json: the error names config.json."""
    case = _case_with(tmp_path, "config.json", text)
    with pytest.raises(MrcError) as info:
        testing.load_case(str(case))
    assert str(info.value).startswith(str(case / "config.json") + ": ") and words in str(info.value), info.value


@pytest.mark.parametrize("name", [cases.MANIFEST, "acts.h5"])
def test_a_fifo_in_a_case_is_named_as_not_a_regular_file(tmp_path, name):
    """A FIFO manifest is not 'an unknown case version', a FIFO acts.h5 is not
    'missing': both are named as what they are, and never opened (it would block)."""
    case = tmp_path / "case"
    shutil.copytree(cases.case_dir("tiny-1xn"), case)
    os.remove(case / name)
    os.mkfifo(case / name)
    with pytest.raises(MrcError) as info:
        testing.load_case(str(case))
    message = str(info.value)
    assert "not a regular file" in message and name in message and "missing" not in message, message


def test_a_directory_without_manifest_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(MrcError, match="empty: no MANIFEST.json: not a case directory"):
        testing.load_case(str(tmp_path / "empty"))


def test_a_manifest_that_is_not_json_is_an_error_naming_the_file(tmp_path):
    case = tmp_path / "case"
    shutil.copytree(cases.case_dir("tiny-1xn"), case)
    (case / cases.MANIFEST).write_text("{not json", encoding="utf-8")
    with pytest.raises(MrcError, match="MANIFEST.json: not a valid JSON file"):
        testing.load_case(str(case))


def test_probe_ranks_are_ints_in_python_and_strings_in_json(loaded):
    """Issue 17, item 5: ``expected["stage1"][5]``; the JSON keeps strings;
    a string key still finds the probe (code written for earlier releases)."""
    for version in cases.versions():
        case = testing.load_case("tiny-1xn", version)
        probes = case["layers"]["layers.2"]["expected"]["stage1"]
        assert list(probes) == [4, 5] and all(type(r) is int for r in probes)
        assert probes[5] is probes["5"] and 5 in probes and "5" in probes and 6 not in probes
        assert probes[5]["eigen_gap"] > 0  # schema 1's relative_gap, under the current name
        with pytest.raises(KeyError):
            probes[6]
        with open(os.path.join(case["path"], "expected.json"), encoding="utf-8") as fh:
            assert list(json.load(fh)["layers"]["layers.2"]["stage1"]) == ["4", "5"]


def test_released_versions_are_immutable(tmp_path, capsys):
    for version in VERSIONS:
        with pytest.raises(MrcError, match="released cases are immutable"):
            generate.regenerate(version)
        assert cases_cli.main(["regenerate", "--version", version]) == 2
        assert "python -m mrc_ref.cases: error:" in capsys.readouterr().err
    assert cases_cli.main(["regenerate", "--version", "latest", "--into", str(tmp_path)]) == 2
    assert "expected 'v' and a number" in capsys.readouterr().err and not os.listdir(tmp_path)


def test_regenerate_writes_and_labels_the_version_it_is_given(tmp_path, capsys):
    """``regenerate --version v9`` writes v9/<id> whose files all say v9, loadable."""
    assert cases_cli.main(["regenerate", "--version", "v9", "--into", str(tmp_path), "--only", "tiny-1xn"]) == 0
    assert "v9/tiny-1xn" in capsys.readouterr().out
    case = cases.read_case(tmp_path / "v9" / "tiny-1xn")
    assert case["version"] == "v9" and case["expected"]["version"] == "v9"
    assert case["metadata"]["source"] == "mrc_ref.cases.generate v9/tiny-1xn"
    assert case["manifest"]["schema_version"] == cases.SCHEMA_VERSION == 2
    released = testing.load_case("tiny-1xn", LATEST)
    assert compare.compare(case["expected"], released["expected"], released) == []


@pytest.mark.parametrize("version", VERSIONS)
def test_list_command(version, capsys):
    assert cases_cli.main(["list"] + (["--version", version] if version != LATEST else [])) == 0
    out = capsys.readouterr().out
    assert all(f"{version}/{case_id}" in out for case_id in cases.case_ids(version)) and "MB" in out


@pytest.mark.slow
def test_the_generator_reproduces_the_released_cases(tmp_path, loaded):
    """Regenerated from scratch (inputs included), every case matches the
    released one within its tolerances."""
    generate.regenerate(generate.VERSION, into=str(tmp_path))
    assert generate.VERSION == LATEST
    for case_id in IDS:
        fresh = cases.read_case(tmp_path / LATEST / case_id)
        assert compare.compare(fresh["expected"], loaded[case_id]["expected"], loaded[case_id]) == [], case_id


@pytest.mark.slow
def test_a_built_wheel_contains_every_case(tmp_path):
    """Build a wheel from a copy of the sources (not in the shared tree) and
    list it: every case file is package data. The build runs offline, without
    build isolation, so it needs the build backend pyproject.toml asks for in
    this environment (a fresh venv's bundled setuptools may be older: the test
    then skips, and CI's second run installs it)."""
    import importlib.metadata

    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11's tomllib")
    Requirement = pytest.importorskip("packaging.requirements").Requirement

    with open(os.path.join(REPO, "pyproject.toml"), "rb") as fh:
        requires = [Requirement(r) for r in tomllib.load(fh)["build-system"]["requires"]]
    for req in requires:
        try:
            have = importlib.metadata.version(req.name)
        except importlib.metadata.PackageNotFoundError:
            have = None
        if have is None or not req.specifier.contains(have, prereleases=True):
            pytest.skip(f"building the wheel offline needs {req} in this environment (found {have})")
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(REPO, name), src)
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.partial")
    for name in ("mrc_ref", "data_tools"):
        shutil.copytree(os.path.join(REPO, name), src / name, ignore=ignore)
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                           "-q", "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("mrc_ref-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for version, case_id in ALL:
        for name in cases.CASE_FILES + (cases.MANIFEST,):
            assert f"mrc_ref/cases/{version}/{case_id}/{name}" in names, (version, case_id, name)
    assert {"mrc_ref/testing.py", "mrc_ref/verify/__init__.py", "mrc_ref/verify/__main__.py",
            "mrc_ref/formats/acts.py", "data_tools/capture/__main__.py"} <= names
