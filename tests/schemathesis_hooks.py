"""A schemathesis check of our own, loaded with SCHEMATHESIS_HOOKS=schemathesis_hooks (tests/ on PYTHONPATH).

Schema-valid bodies may still be refused for rules a JSON schema cannot state: the prompt and max_tokens together
beyond the context window, a prompt past /instruct's training length, a chat the prompt template cannot take (its
last message not the user's), a response_format schema the grammar library refuses (any object is schema-valid there),
JSON output asked of a beam search, a LoRA adapter folder to load that is not one or a name taken already
(routes/lora.py). tests/schemathesis.toml lets positive_data_acceptance take a 400; this check then
fails every 400 to a schema-valid body whose error code is not one of those rules, so no other refusal slips through."""

import schemathesis

RULES_NO_SCHEMA_STATES = {
    "context_length_exceeded",
    "prompt_too_long",
    "invalid_messages",
    "invalid_json_schema",
    "response_format_with_beams",
    "response_format_unwritable",
    "invalid_lora_adapter",
    "lora_adapter_exists",
}


@schemathesis.check
def refusals_name_a_rule_the_schema_cannot_state(ctx, response, case):
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive or response.status_code != 400:
        return None
    try:
        code = response.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        code = None
    if code not in RULES_NO_SCHEMA_STATES:
        raise AssertionError(f"a schema-valid body got a 400 with code {code!r}: {response.text[:300]}")
    return None
