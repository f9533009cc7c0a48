"""self_instruct/prompting.py: prompt.txt, encode_prompt, parsing an answer into tasks, the original's filters and
the seed tasks, each tested directly on golden text."""

import json
import re
from collections import Counter

import pytest

from alpaca_trainml.self_instruct import prompting as self_instruct

K = 3  # example tasks per prompt, the original's default


def test_prompt_txt_numbers_its_rules_1_to_n_and_keeps_the_requirements():
    text = self_instruct.PROMPT_PATH.read_text()
    numbers = [int(m) for m in re.findall(r"^(\d+)\. ", text, flags=re.M)]
    assert numbers == list(range(1, len(numbers) + 1)) and len(numbers) >= 7  # the original repeats 2 and 3
    for needle in ("20", "<noinput>", "100 words", "English", "one or two sentences", "verb", "text-only"):
        assert needle in text, needle


def test_encode_prompt_golden_and_independent_of_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # prompt.txt is found next to the code, not here
    tasks = [
        {"instruction": "  Sort   these\n words:", "input": "pear apple", "output": "apple pear"},
        {"instruction": "Name a prime number.", "input": "", "output": "7"},
    ]
    expected = (
        self_instruct.PROMPT_PATH.read_text().rstrip("\n") + "\n"
        "###\n1. Instruction: Sort these words\n1. Input:\npear apple\n1. Output:\napple pear\n"
        "###\n2. Instruction: Name a prime number.\n2. Input:\n<noinput>\n2. Output:\n7\n"
        "###\n3. Instruction:"
    )
    assert self_instruct.encode_prompt(tasks) == expected


RESPONSE = (
    " Explain why the sky looks blue at noon.\n4. Input:\n<noinput>\n4. Output:\nSunlight scatters.\n###\n"
    "5. Instruction: Draw a picture of a happy cat.\n5. Input:\n<noinput>\n5. Output:\nNo.\n###\n"
    "6. Instruction: Write a program that adds two numbers.\n6. Input:\n1 2\n6. Output:\n3\n###\n"
    "7. Instruction: Name three fruits.\n7. Input:\n<noinput>\n7. Output:\nApple.\n###\n"
    '8. Instruction: "Quote" this sentence back to me please.\n8. Input:\nHi\n8. Output:\nHi\n###\n'
    "9. Instruction: Élaborez a short plan for the week ahead.\n9. Input:\n<noinput>\n9. Output:\nOK\n###\n"
    "10. Instruction: This piece has no input or output markers at all\n###\n"
    "11. Instruction:   Summarize the note in one line.  \n11. Input:\n  Buy milk, call Sam.  \n"
    "11. Output:\nErrands.\n###\n"
    "12. Instruction: Translate this greeting into French please.\n12. Input:\nHello\n12. Output:\nBonj"
)


def test_post_process_gpt3_response_golden():
    kept = self_instruct.post_process_gpt3_response(K, {"text": RESPONSE, "finish_reason": "stop"})
    assert kept == [
        {"instruction": "Explain why the sky looks blue at noon.", "input": "", "output": "Sunlight scatters."},
        {"instruction": "Summarize the note in one line.", "input": "Buy milk, call Sam.", "output": "Errands."},
        {"instruction": "Translate this greeting into French please.", "input": "Hello", "output": "Bonj"},
    ]
    # finish_reason "length": the last piece (task 12) is dropped even though it parses
    cut = self_instruct.post_process_gpt3_response(K, {"text": RESPONSE, "finish_reason": "length"})
    assert [r["instruction"] for r in cut] == [r["instruction"] for r in kept[:2]]
    assert self_instruct.post_process_gpt3_response(K, None) == []


def test_parse_response_counts_and_rejection_reasons():
    stats = Counter()
    records = self_instruct.parse_response(K, RESPONSE, "length", stats)
    assert stats == {"malformed": 1, "truncated": 1}  # task 10 has no markers; task 12 is the cut-off last piece
    reasons = [self_instruct.rejection_reason(r["instruction"]) for r in records]
    assert reasons == [None, "blocklist", "program", "length", "punctuation", "non_ascii", None]


def test_the_prompts_scaffolding_inside_a_record_is_a_rejection_reason():
    # what a weak local teacher sent (issue 15): its own numbering inside one task
    leaked = {"instruction": "1. Instruction: Write a story.\n2. Input:\n<noinput>", "input": "", "output": "Once."}
    in_output = {"instruction": "Explain why the sky is blue.", "input": "", "output": "Light.\n7. Output: again"}
    plain = {"instruction": "Explain why leaves turn red.", "input": "", "output": "Step 1. Pigments change."}
    reasons = [self_instruct.record_rejection_reason(r) for r in (leaked, in_output, plain)]
    assert reasons == ["scaffolding", "scaffolding", None]
    text = " Write a story.\n4. Input:\n<noinput>\n4. Output:\n1. Instruction: Tell a joke.\n###"
    assert self_instruct.post_process_gpt3_response(K, {"text": text, "finish_reason": "stop"}) == []


def test_filters_word_count_bounds_and_blocklist_words():
    assert self_instruct.rejection_reason("one two three") == "length"  # <= 3 words dropped
    assert self_instruct.rejection_reason("one two three four") is None
    assert self_instruct.rejection_reason(" ".join(["word"] * 150)) is None  # > 150 dropped
    assert self_instruct.rejection_reason(" ".join(["word"] * 151)) == "length"
    assert self_instruct.find_word_in_string("image", "Describe this IMAGE please")
    assert not self_instruct.find_word_in_string("image", "Imagine a world without cars")  # whole words only
    assert self_instruct.rejection_reason("Tell me how to go to the station") == "blocklist"
    assert self_instruct.rejection_reason("Write a program, or explain the idea") == "program"
    assert self_instruct.rejection_reason("write a program that prints hi") is None  # case-sensitive, as the original


def test_strip_chat_echo_drops_the_restated_task_header():
    assert self_instruct.strip_chat_echo("###\n4. Instruction: Do X now.\n4. Input:", 3) == " Do X now.\n4. Input:"
    assert self_instruct.strip_chat_echo("4.  Instruction: Do X", 3) == " Do X"
    assert self_instruct.strip_chat_echo(" Do X", 3) == " Do X"


def test_project_seed_tasks_schema_and_mix():
    lines = [json.loads(line) for line in self_instruct.SEED_TASKS_PATH.read_text().splitlines() if line.strip()]
    assert len(lines) == 175  # the Self-Instruct count, which the issue asks for
    assert all(set(t) == {"id", "name", "instruction", "instances", "is_classification"} for t in lines)
    assert len({t["id"] for t in lines}) == 175 and len({t["instruction"] for t in lines}) == 175
    with_input = sum(bool(t["instances"][0]["input"]) for t in lines)
    assert 0.25 <= with_input / 175 <= 0.45  # "about a third with inputs"
    assert len(self_instruct.load_seed_tasks(self_instruct.SEED_TASKS_PATH)) == 175


def test_load_seed_tasks_reads_the_self_instruct_layout_and_reports_every_bad_line(tmp_path):
    good = tmp_path / "seed.jsonl"  # Self-Instruct's layout: extra fields, several instances, the first one used
    good.write_text(
        json.dumps(
            {
                "id": "seed_task_0",
                "name": "x",
                "instruction": "Add the numbers.",
                "is_classification": False,
                "instances": [{"input": "2 3", "output": "5"}, {"input": "1 1", "output": "2"}],
            }
        )
        + "\n\n"
    )
    assert self_instruct.load_seed_tasks(good) == [{"instruction": "Add the numbers.", "input": "2 3", "output": "5"}]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"instruction": "ok", "instances": [{"input": "", "output": "y"}]}\n{not json\n'
        '{"instances": []}\n{"instruction": "x", "instances": [{"input": ""}]}\n'
    )
    with pytest.raises(ValueError) as err:
        self_instruct.load_seed_tasks(bad)
    msg = str(err.value)
    assert str(bad) in msg and "3 bad seed task(s)" in msg
    assert all(f"line {n}:" in msg for n in (2, 3, 4)) and "line 1:" not in msg
