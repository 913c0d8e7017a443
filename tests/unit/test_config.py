from pathlib import Path

import pytest

from workers.core.config import ConfigError, load_pipelines

ROOT = Path(__file__).resolve().parents[2]


def test_shipped_pipelines_load_with_default_topics() -> None:
    pipelines = load_pipelines(ROOT / "pipelines")
    assert set(pipelines) >= {"classify", "reply", "summarize"}
    for task, pipeline in pipelines.items():
        assert pipeline.input_topic == f"jobs.{task}"
        assert pipeline.result_topic == f"results.{task}"
        assert pipeline.dlq_topic == f"jobs.{task}.dlq"
    assert pipelines["classify"].output_schema is not None


def test_defaults_fill_missing_topics(tmp_path: Path) -> None:
    (tmp_path / "t.yaml").write_text('task: echo\nprompt_template: "say {input}"\n')
    pipeline = load_pipelines(tmp_path)["echo"]
    assert (pipeline.input_topic, pipeline.result_topic) == ("jobs.echo", "results.echo")
    assert pipeline.render_prompt('{"a": 1}') == 'say {"a": 1}'


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ('task: echo\nprompt_template: "no placeholder"\n', "{input}"),
        ('task: echo\nprompt_template: "{input}"\noutput_schema: missing.json\n', "missing.json"),
        ('task: echo\nprompt_template: "{input}"\nsurprise: 1\n', "surprise"),
        ("- a list\n", "mapping"),
    ],
)
def test_bad_pipeline_names_file_and_problem(tmp_path: Path, content: str, fragment: str) -> None:
    (tmp_path / "bad.yaml").write_text(content)
    with pytest.raises(ConfigError) as error:
        load_pipelines(tmp_path)
    assert "bad.yaml" in str(error.value)
    assert fragment in str(error.value)
