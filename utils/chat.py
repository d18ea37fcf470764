"""The chat template: role and end-of-turn markers as single special tokens, and conversations -> (ids, labels).

A conversation is rendered as
    <|system|>You are terse.<|end|><|user|>Hi<|end|><|assistant|>Hello.<|end|>
with no other whitespace; a prompt for the model's next answer ends with `<|assistant|>`. The same rule is stored
as a Jinja `chat_template` in tokenizer_config.json (CHAT_TEMPLATE), so transformers' AutoTokenizer renders it too.

Encoding joins the pieces' ids (marker id, content ids, end id) rather than encoding the rendered string, so a
message that contains the text "<|end|>" cannot forge a turn (our tokenizer encodes special-token text inside
content as plain text); for ordinary content the ids equal AutoTokenizer.apply_chat_template's.

Labels (for the loss) are the ids of each trained assistant message's content and its end-of-turn marker;
everything else (system and user turns, the role markers) is -100.
"""
from __future__ import annotations

ROLES = ("system", "user", "assistant")
ROLE_TOKENS = {role: f"<|{role}|>" for role in ROLES}
END_TOKEN = "<|end|>"
CHAT_TOKENS = [*ROLE_TOKENS.values(), END_TOKEN]
IGNORE = -100
CHAT_TEMPLATE = ("{% for message in messages %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")


def has_chat_tokens(tokenizer) -> bool:
    return all(tokenizer.backend.token_to_id(t) is not None for t in CHAT_TOKENS)


def add_chat_tokens(tokenizer) -> list[str]:
    """Add the role and end-of-turn markers the tokenizer lacks, as special tokens (new ids at the end of its
    vocabulary). Returns the tokens added; the model's embedding must then grow to tokenizer.vocab_size."""
    missing = [t for t in CHAT_TOKENS if tokenizer.backend.token_to_id(t) is None]
    if missing:
        tokenizer.backend.add_special_tokens(missing)
    return missing


def end_id(tokenizer) -> int:
    return _id(tokenizer, END_TOKEN)


def _id(tokenizer, token: str) -> int:
    i = tokenizer.backend.token_to_id(token)
    if i is None:
        raise ValueError(f"the tokenizer has no {token} token; add the chat tokens first (add_chat_tokens)")
    return i


def render(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The conversation as text (what CHAT_TEMPLATE renders)."""
    text = "".join(f"{ROLE_TOKENS[m['role']]}{m['content']}{END_TOKEN}" for m in messages)
    return text + (ROLE_TOKENS["assistant"] if add_generation_prompt else "")


def encode_chat(tokenizer, messages: list[dict], train_from: int = 0,
                add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
    """Token ids and labels of a conversation.

    Args:
        messages: [{"role": "system"|"user"|"assistant", "content": str}, ...]
        train_from: only assistant messages at this index or later are labelled (DPO: the completion)
        add_generation_prompt: end with the assistant marker (a prompt for the next answer; not labelled)
    Returns:
        ids, labels: equal-length lists; labels[i] = ids[i] on trained assistant content and its end marker,
        else -100
    """
    end = end_id(tokenizer)
    ids, labels = [], []
    for i, m in enumerate(messages):
        content = tokenizer.encode(m["content"]) + [end]
        trained = m["role"] == "assistant" and i >= train_from
        ids += [_id(tokenizer, ROLE_TOKENS[m["role"]])] + content
        labels += [IGNORE] + (content if trained else [IGNORE] * len(content))
    if add_generation_prompt:
        ids.append(_id(tokenizer, ROLE_TOKENS["assistant"]))
        labels.append(IGNORE)
    return ids, labels
