import pytest

from tdml_core.config import JobSpec, SpecError, load_spec, parse_spec


def test_example_spec_loads():
    spec = load_spec("examples/digits.yaml")
    assert spec.data_parallel == 2 and spec.stages == 2 and spec.top_k == 2
    assert spec.microbatch_size * spec.microbatches == spec.batch_size


@pytest.mark.parametrize(
    "data, field",
    [
        ({"epochz": 3}, "epochz: unknown field"),
        ({"epochs": "many"}, "epochs:"),
        ({"data_parallel": 2, "top_k": 3}, "top_k (3) must not exceed data_parallel (2)"),
        ({"batch_size": 30, "microbatches": 4}, "batch_size (30) must divide evenly into microbatches (4)"),
        ({"dataset": {"name": "cifar10", "path": "/no/such/folder"}}, "dataset.path: path does not exist"),
        ({"dataset": {"name": "cifar10"}}, "cifar10 needs `path`"),
        ({"schedule": "1f1b", "stages": 4, "microbatches": 2, "batch_size": 8}, "1f1b needs microbatches"),
        ({"stages": "auto"}, "stages 'auto' needs `trainers`"),
        ({"schedule": "zigzag"}, "schedule:"),
    ],
)
def test_bad_spec_names_the_field(data, field):
    with pytest.raises(SpecError) as err:
        parse_spec(data, "job.yaml")
    assert field in str(err.value)
    assert str(err.value).startswith("job.yaml: invalid job spec")


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(SpecError, match="no such spec file"):
        load_spec(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: [1, 2\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(SpecError, match="mapping of fields"):
        load_spec(listy)


def test_relative_dataset_path_is_taken_from_the_spec_folder(tmp_path):
    (tmp_path / "cifar").mkdir()
    spec_file = tmp_path / "job.yaml"
    spec_file.write_text("dataset: {name: cifar10, path: cifar}\n")
    assert load_spec(spec_file).dataset.path == tmp_path / "cifar"


def test_defaults_are_a_valid_job():
    spec = JobSpec()
    assert spec.model == "digits_cnn" and spec.dataset.name == "digits"
