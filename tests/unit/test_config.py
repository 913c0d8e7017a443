from pathlib import Path

import pytest

from workers.core.config import (
    ConfigError,
    SamplingDefaults,
    SamplingLimits,
    SamplingOutOfBounds,
    StopLimit,
    load_pipelines,
)
from workers.core.contracts import JobParams

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


def test_paths_resolve_relative_to_the_pipeline_file(tmp_path: Path) -> None:
    folder = tmp_path / "project" / "pipelines"
    (folder / "templates").mkdir(parents=True)
    (tmp_path / "project" / "schemas").mkdir()
    (tmp_path / "project" / "schemas" / "out.json").write_text('{"type": "object"}')
    (folder / "templates" / "chat.jinja").write_text("{{ messages }}")
    (folder / "assist.yaml").write_text(
        "task: assist\n"
        "output_schema: ../schemas/out.json\n"
        "chat:\n  system: Be brief.\n  template: templates/chat.jinja\n"
    )
    pipeline = load_pipelines(folder)["assist"]
    assert pipeline.output_schema == {"type": "object"}
    assert pipeline.chat is not None
    assert (pipeline.chat.system, pipeline.chat.template) == ("Be brief.", "{{ messages }}")
    assert pipeline.prompt_template is None


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("task: echo\n", "prompt_template, chat, or both"),
        ("task: echo\nchat:\n  template: nowhere.jinja\n", "chat.template"),
        ("task: echo\nchat:\n  template: 3\n", "chat.template"),
        ("task: echo\nchat:\n  surprise: 1\n", "chat.surprise"),
        ("task: echo\nchat: {}\nsampling:\n  top_p: 1.5\n", "sampling.top_p"),
        (
            "task: echo\nchat: {}\nsampling:\n  temperature: 1.5\n  limits:\n"
            "    temperature: [0.0, 1.0]\n",
            "sampling: temperature: the default 1.5 is above the pipeline's limit 1.0",
        ),
        (
            "task: echo\nchat: {}\nsampling:\n  limits:\n    top_p: [0.9, 0.5]\n",
            "sampling.limits.top_p",
        ),
        (
            "task: echo\nchat: {}\nsampling:\n  limits:\n    temperature: [0.0, .nan]\n",
            "sampling.limits.temperature",
        ),
        (
            "task: echo\nchat: {}\nsampling:\n  stop: [a, b]\n  limits:\n    stop: {count: 1}\n",
            "sampling: stop: the default",
        ),
        ("task: echo\nchat: {}\nsampling:\n  min_tokens: 9\n  max_tokens: 8\n", "min_tokens"),
        (
            "task: echo\nchat: {}\nrouting:\n  classifier:\n    adapter: c\n"
            "    labels: {a: base}\n",
            "routing.classifier.prompt_template",
        ),
    ],
)
def test_bad_chat_and_sampling_sections_name_file_and_field(
    tmp_path: Path, content: str, fragment: str
) -> None:
    (tmp_path / "bad.yaml").write_text(content)
    with pytest.raises(ConfigError) as error:
        load_pipelines(tmp_path)
    assert "bad.yaml" in str(error.value)
    assert fragment in str(error.value)
    assert "\n" not in str(error.value)  # one line


def test_sampling_limits_bound_a_jobs_params() -> None:
    sampling = SamplingDefaults(
        max_tokens=32,
        top_p=0.9,
        stop=["\n\n"],
        limits=SamplingLimits(
            max_tokens=(1, 64),
            temperature=(0.0, 1.0),
            top_p=(0.5, 1.0),
            presence_penalty=(-1.0, 1.0),
            stop=StopLimit(count=2, length=4),
        ),
    )
    values = sampling.for_job(JobParams(temperature=0.7, stop=["END"]))
    assert (values.max_tokens, values.temperature, values.top_p) == (32, 0.7, 0.9)
    assert values.stop == ["END"]  # a job's stop list replaces the default one
    assert sampling.for_job(None).stop == ["\n\n"]
    refusals = {
        "params.max_tokens: 65 is above the pipeline's limit 64": JobParams(max_tokens=65),
        "params.temperature: 1.5 is above the pipeline's limit 1.0": JobParams(temperature=1.5),
        "params.top_p: 0.4 is below the pipeline's limit 0.5": JobParams(top_p=0.4),
        "params.presence_penalty: -1.5 is below the pipeline's limit -1.0": JobParams(
            presence_penalty=-1.5
        ),
        "params.stop: 3 strings are more than the pipeline's limit 2": JobParams(
            stop=["a", "b", "c"]
        ),
        "params.stop: string 1 has 5 characters, more than the pipeline's limit 4": JobParams(
            stop=["a", "bbbbb"]
        ),
        "params.min_tokens: 40 is above max_tokens 32": JobParams(min_tokens=40),
    }
    for reason, params in refusals.items():
        with pytest.raises(SamplingOutOfBounds) as refused:
            sampling.for_job(params)
        assert str(refused.value) == reason
