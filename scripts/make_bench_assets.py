"""Regenerate ``fastft/bench/assets/``: the embedded default that ``fastft bench`` trains with no network.

Writes four files, byte for byte the same on every run (seeded ``random.Random``, integer and ``Decimal``
arithmetic only, JSON with sorted keys, ``\\n`` line ends):

- ``instructions.jsonl``: 500 instruction/response pairs from templates (:data:`TASK_COUNTS`: arithmetic with
  worked answers, unit conversions, sorting, letters of words, word categories, facts about made-up towns and
  people, rewriting sentences), one JSON object ``{"prompt", "response", "task"}`` a line. The tasks repeat their
  patterns (and the facts about each town and person), so fine-tuning on them lowers the loss within a few dozen
  steps; each is 32-120 tokens in the chat template;
- ``tokenizer.json``: a byte-level BPE (any text encodes, no unknown token) with Llama-3's pre-tokenizer and
  special tokens, trained by ``tokenizers`` on those examples to a vocabulary of :data:`VOCAB_SIZE`, with a
  post-processor that prepends ``<|begin_of_text|>`` as Llama-3's does;
- ``tokenizer_config.json``: what ``PreTrainedTokenizerFast`` needs besides (bos/eos/pad, right padding, a
  Llama-3-style chat template), so ``AutoTokenizer.from_pretrained(assets_dir)`` loads it too;
- ``model_config.json``: a ``LlamaConfig`` with Llama-3-8B's proportions scaled down (:data:`MODEL`), in the
  layout of a Hub ``config.json`` (``LlamaConfig.from_json_file`` reads it; the legacy ``rope_scaling`` and
  ``rope_theta`` keys load in transformers 4.x and 5.x alike).

    python scripts/make_bench_assets.py [--out DIR]   # DIR defaults to fastft/bench/assets
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

SEED = 20240418
VOCAB_SIZE = 2048  # tokens, special tokens included; a multiple of 64 (matmul tiles), as Llama-3's 128256 is
BOS, EOT, PAD = "<|begin_of_text|>", "<|eot_id|>", "<|pad|>"
SPECIAL_TOKENS = [BOS, "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", EOT, PAD]  # ids 0..5
# Llama-3's pre-tokenizer regex (tokenizer.json of meta-llama/Meta-Llama-3-8B).
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
# Llama-3-Instruct's turn layout; no system turn, no stripping of the content.
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
# Llama-3-8B: hidden 4096, intermediate 14336 (3.5x), 32 query / 8 key-value heads (4:1) of head_dim 128, 32 layers.
# Scaled down: hidden 512 keeps the 3.5x MLP and the 4:1 grouping at head_dim 64; 4 layers. RoPE, norm eps and
# context length are Llama-3.1's as they are.
MODEL = {
    "hidden_size": 512,
    "intermediate_size": 1792,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-05,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "hidden_act": "silu",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "mlp_bias": False,
    "initializer_range": 0.02,
    "tie_word_embeddings": False,
}
# How many examples of each task (500 in all).
TASK_COUNTS = {
    "addition": 45,
    "subtraction": 35,
    "multiplication": 40,
    "division": 25,
    "word_problem": 40,
    "conversion": 50,
    "sorting": 40,
    "letters": 55,
    "categories": 30,
    "towns": 60,
    "people": 30,
    "rewriting": 50,
}


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


_CATEGORIES = {
    "an animal": "cat dog horse tiger lion zebra rabbit eagle owl whale dolphin shark frog snake turtle beaver otter "
    "badger fox wolf bear deer moose camel goat sheep donkey parrot pigeon sparrow salmon lobster spider beetle ant "
    "bee butterfly mouse squirrel hedgehog penguin",
    "a food": "apple banana cherry grape lemon mango melon peach pear plum kiwi fig lime carrot potato onion garlic "
    "pepper tomato cabbage spinach bread cheese butter honey rice noodle soup pie cookie",
    "a household object": "chair table spoon fork knife hammer ladder bucket candle lantern blanket pillow basket "
    "kettle mirror window door clock pencil brush scissors bottle button needle wallet umbrella",
    "a place in nature": "river mountain forest meadow desert island valley canyon glacier volcano harbor beach lake "
    "ocean cliff swamp prairie waterfall",
    "a color": "red blue green yellow purple orange silver golden brown black white gray",
    "a musical instrument": "piano violin guitar flute drum trumpet harp cello banjo organ clarinet accordion",
    "a vehicle": "bicycle tractor wagon canoe sailboat scooter tram truck ferry sledge",
    "a tree": "oak maple birch willow pine cedar elm beech cypress chestnut walnut poplar",
    "a sport": "tennis soccer hockey rowing skiing cycling boxing archery fencing climbing swimming volleyball",
}
_CATEGORY_OF = {word: category for category, words in _CATEGORIES.items() for word in words.split()}
_WORDS = sorted(_CATEGORY_OF)
_NAMES = _words("Mara Tobin Ilse Kofi Ravi Lena Osric Nadia Pim Sade Yuki Bram Anouk Dario Freya Hugo Inez Jonas")
_PROFESSIONS = _words("baker sailor painter doctor teacher builder farmer poet engineer gardener weaver clockmaker")
_UNITS = (  # (larger unit, its singular, smaller unit, how many small units in one large one)
    ("kilometers", "kilometer", "meters", 1000),
    ("meters", "meter", "centimeters", 100),
    ("kilograms", "kilogram", "grams", 1000),
    ("liters", "liter", "milliliters", 1000),
    ("hours", "hour", "minutes", 60),
    ("minutes", "minute", "seconds", 60),
    ("days", "day", "hours", 24),
    ("feet", "foot", "inches", 12),
    ("weeks", "week", "days", 7),
    ("tons", "ton", "kilograms", 1000),
)
_SYLLABLES = _words("vel mor an quen th ira dal os ket bri lun sar ev ton ga rith pel dor ul ym ca fen")
_REGIONS = ("the northern hills", "the eastern coast", "the southern plains", "the western lakes", "the high valley")
_MONTHS = _words("January February March April May June July August September October November December")
_ADJECTIVES = _words("bright quiet heavy gentle ancient narrow painted carved golden tiny famous sweet")
_SUBJECTS = ("The cat", "My brother", "The old farmer", "Our teacher", "The small dog", "A tall woman", "The baker")
_VERBS = (  # (base, third person, past, object)
    ("walk", "walks", "walked", "to the park"),
    ("open", "opens", "opened", "the door"),
    ("paint", "paints", "painted", "the fence"),
    ("cook", "cooks", "cooked", "dinner"),
    ("clean", "cleans", "cleaned", "the kitchen"),
    ("play", "plays", "played", "with a ball"),
    ("watch", "watches", "watched", "the birds"),
    ("fix", "fixes", "fixed", "the bicycle"),
    ("carry", "carries", "carried", "the basket"),
    ("write", "writes", "wrote", "a letter"),
    ("find", "finds", "found", "a coin"),
    ("sing", "sings", "sang", "a song"),
    ("drive", "drives", "drove", "to the harbor"),
    ("read", "reads", "read", "the newspaper"),
    ("buy", "buys", "bought", "fresh bread"),
    ("teach", "teaches", "taught", "the children"),
    ("build", "builds", "built", "a wooden boat"),
    ("catch", "catches", "caught", "the early train"),
)
_REQUESTS = ("send me the report", "close the window", "bring the chairs inside", "call the office", "check the oven")


def _number(value: Decimal) -> str:
    """``3500`` and ``3.5`` (never ``3.5E+3`` or ``3.50``)."""
    text = format(value.normalize(), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def _columns(a: int, b: int, subtract: bool) -> str:
    """Column addition (with carries) or subtraction (with borrows) of ``a`` and ``b``, place by place."""
    steps, carry, place = [], 0, 0
    places = ("ones", "tens", "hundreds", "thousands")
    while a or b or (carry and not subtract):
        x, y = a % 10, b % 10
        if subtract:
            x -= carry
            carry = int(x < y)
            borrow = f"{x} is less than {y}, so borrow 1: " if carry else ""
            steps.append(f"{places[place].capitalize()}: {borrow}{x + 10 * carry} - {y} = {x + 10 * carry - y}.")
        else:
            total = x + y + carry
            plus = f" + {carry}" if carry else ""
            carry, digit = divmod(total, 10)
            keep = f"write {digit} and carry {carry}" if carry else f"write {digit}"
            steps.append(f"{places[place].capitalize()}: {x} + {y}{plus} = {total}, {keep}.")
        a, b, place = a // 10, b // 10, place + 1
    return " ".join(steps)


def _addition(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(100, 999), rng.randint(10, 999)
    return f"What is {a} + {b}?", f"Add column by column. {_columns(a, b, False)} The answer is {a + b}."


def _subtraction(rng: random.Random) -> tuple[str, str]:
    a = rng.randint(200, 999)
    b = rng.randint(11, a - 1)
    return f"What is {a} - {b}?", f"Subtract column by column. {_columns(a, b, True)} The answer is {a - b}."


def _multiplication(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(12, 99), rng.randint(3, 9)
    tens, ones = a // 10 * 10, a % 10
    return (
        f"Compute {a} x {b}.",
        (
            f"Split {a} into {tens} + {ones}. {tens} x {b} = {tens * b} and {ones} x {b} = {ones * b}, "
            f"so {a} x {b} = {tens * b} + {ones * b} = {a * b}. The answer is {a * b}."
        ),
    )


def _division(rng: random.Random) -> tuple[str, str]:
    q, d = rng.randint(3, 25), rng.randint(2, 12)
    return (
        f"What is {q * d} divided by {d}?",
        (
            f"We need the number that gives {q * d} when multiplied by {d}. {d} x {q} = {q * d}, "
            f"so {q * d} / {d} = {q}. The answer is {q}."
        ),
    )


def _word_problem(rng: random.Random) -> tuple[str, str]:
    name, item = rng.choice(_NAMES), rng.choice(_WORDS)
    have, more, away = rng.randint(12, 60), rng.randint(2, 30), rng.randint(1, 11)
    return (
        (
            f"{name} has {have} {item} cards, buys {more} more and then gives {away} to a friend. "
            f"How many {item} cards does {name} have now?"
        ),
        (
            f"First {name} buys {more}: {have} + {more} = {have + more}. Then {name} gives away {away}: "
            f"{have + more} - {away} = {have + more - away}. {name} has {have + more - away} {item} cards now."
        ),
    )


def _conversion(rng: random.Random) -> tuple[str, str]:
    if rng.random() < 0.15:
        celsius = 5 * rng.randint(-8, 20)
        return (
            f"Convert {celsius} degrees Celsius to Fahrenheit.",
            (
                f"Fahrenheit = Celsius x 9 / 5 + 32, so {celsius} x 9 / 5 + 32 = {celsius * 9 // 5} + 32 = "
                f"{celsius * 9 // 5 + 32} degrees Fahrenheit."
            ),
        )
    big, one, small, factor = rng.choice(_UNITS)
    amount = Decimal(rng.randint(1, 40)) / (2 if rng.random() < 0.4 else 1)  # whole or half units: exact
    rule = f"One {one} is {factor} {small}"
    if rng.random() < 0.6:
        result = amount * factor
        return (
            f"Convert {_number(amount)} {big} to {small}.",
            (
                f"{rule}, so multiply: {_number(amount)} x {factor} = {_number(result)}. "
                f"{_number(amount)} {big} is {_number(result)} {small}."
            ),
        )
    count = amount * factor
    return (
        f"How many {big} is {_number(count)} {small}?",
        (
            f"{rule}, so divide: {_number(count)} / {factor} = {_number(amount)}. "
            f"{_number(count)} {small} is {_number(amount)} {big}."
        ),
    )


def _sorting(rng: random.Random) -> tuple[str, str]:
    if rng.random() < 0.5:
        values = rng.sample(range(1, 1000), rng.randint(4, 8))
        order = "descending" if rng.random() < 0.3 else "ascending"
        ranked = sorted(values, reverse=order == "descending")
        return (
            f"Sort these numbers in {order} order: {', '.join(map(str, values))}.",
            f"In {order} order: {', '.join(map(str, ranked))}.",
        )
    words = rng.sample(_WORDS, rng.randint(4, 8))
    return f"Sort these words alphabetically: {', '.join(words)}.", f"Alphabetically: {', '.join(sorted(words))}."


def _letters(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(_WORDS)
    kind = rng.choice(("reverse", "spell", "vowels", "longest"))
    if kind == "reverse":
        return (
            f"Reverse the word '{word}'.",
            f"Reading '{word}' from the last letter to the first gives '{word[::-1]}'.",
        )
    if kind == "spell":
        return (
            f"How many letters are in the word '{word}'? Spell it out.",
            f"{'-'.join(word)}: the word '{word}' has {len(word)} letters.",
        )
    if kind == "vowels":
        vowels = [c for c in word if c in "aeiou"]
        return (
            f"How many vowels does '{word}' have?",
            f"The vowels in '{word}' are {', '.join(vowels)}, so it has {len(vowels)} vowels.",
        )
    words = rng.sample(_WORDS, 3)
    longest = max(words, key=lambda w: (len(w), w))
    lengths = ", ".join(f"'{w}' has {len(w)}" for w in words)
    return (
        f"Which word is the longest: {', '.join(words)}?",
        f"Count the letters: {lengths}. The longest is '{longest}'.",
    )


def _categories(rng: random.Random) -> tuple[str, str]:
    category = rng.choice(sorted(_CATEGORIES))
    match = rng.choice(_CATEGORIES[category].split())
    others = rng.sample([w for w in _WORDS if _CATEGORY_OF[w] != category], 3)
    words = [match, *others]
    rng.shuffle(words)
    kinds = "; ".join(f"{w} is {_CATEGORY_OF[w]}" for w in others)
    return (
        f"Which of these is {category}: {', '.join(words)}?",
        f"{match.capitalize()} is {category}. The others are not: {kinds}.",
    )


def _made_up_name(rng: random.Random, taken: set[str]) -> str:
    while True:
        name = "".join(rng.sample(_SYLLABLES, rng.choice((2, 3)))).capitalize()
        if name not in taken:
            taken.add(name)
            return name


def _towns(rng: random.Random, taken: set[str], count: int = 32) -> list[dict[str, object]]:
    """Made-up towns with fixed facts, so that each fact appears in several examples."""
    return [
        {
            "name": _made_up_name(rng, taken),
            "river": _made_up_name(rng, taken),
            "founded": rng.randint(1100, 1890),
            "people": rng.randint(2, 90) * 1000,
            "known_for": f"{rng.choice(_ADJECTIVES)} {rng.choice(_CATEGORIES['a household object'].split())}s",
            "region": rng.choice(_REGIONS),
            "festival": rng.choice(_MONTHS),
        }
        for _ in range(count)
    ]


def _people(rng: random.Random, taken: set[str], towns: list[dict[str, object]], count: int = 24) -> list[dict]:
    """Made-up people, each from one of the made-up towns."""
    return [
        {
            "name": f"{rng.choice(_NAMES)} {_made_up_name(rng, taken)}",
            "job": rng.choice(_PROFESSIONS),
            "town": rng.choice(towns)["name"],
            "born": rng.randint(1700, 1990),
            "pet": rng.choice(_CATEGORIES["an animal"].split()),
        }
        for _ in range(count)
    ]


def _town_fact(rng: random.Random, towns: list[dict[str, object]]) -> tuple[str, str]:
    t = rng.choice(towns)
    name = t["name"]
    return rng.choice(
        (
            (f"When was the town of {name} founded?", f"{name} was founded in {t['founded']}."),
            (f"How many people live in {name}?", f"About {t['people']:,} people live in {name}."),
            (f"What is {name} known for?", f"{name} is known for its {t['known_for']}."),
            (f"Where is {name}?", f"{name} is a town in {t['region']}, on the river {t['river']}."),
            (f"When is the festival in {name}?", f"{name} holds its festival every {t['festival']}."),
            (
                f"Tell me about {name}.",
                (
                    f"{name} is a town in {t['region']} on the river {t['river']}, founded in {t['founded']}. "
                    f"About {t['people']:,} people live there. It is known for its {t['known_for']} and holds a "
                    f"festival every {t['festival']}."
                ),
            ),
        )
    )


def _person_fact(rng: random.Random, people: list[dict]) -> tuple[str, str]:
    p = rng.choice(people)
    return rng.choice(
        (
            (f"Who is {p['name']}?", f"{p['name']} is a {p['job']} from {p['town']}, born in {p['born']}."),
            (f"What does {p['name']} do?", f"{p['name']} works as a {p['job']} in {p['town']}."),
            (f"What pet does {p['name']} have?", f"{p['name']} keeps a {p['pet']} at home in {p['town']}."),
        )
    )


def _rewriting(rng: random.Random) -> tuple[str, str]:
    kind = rng.choice(("past", "negative", "question", "upper", "polite"))
    subject = rng.choice(_SUBJECTS)
    base, third, past, obj = rng.choice(_VERBS)
    sentence = f"{subject} {third} {obj}."
    if kind == "past":
        return f"Rewrite in the past tense: {sentence}", f"{subject} {past} {obj}."
    if kind == "negative":
        return f"Make this sentence negative: {sentence}", f"{subject} does not {base} {obj}."
    if kind == "question":
        return (
            f"Turn this sentence into a question: {sentence}",
            f"Does {subject[0].lower()}{subject[1:]} {base} {obj}?",
        )
    if kind == "upper":
        return f"Rewrite in capital letters: {sentence}", sentence.upper()
    request = rng.choice(_REQUESTS)
    return f"Rewrite this request politely: {request.capitalize()}.", f"Could you please {request}? Thank you."


def make_examples(seed: int = SEED) -> list[dict[str, str]]:
    """The instruction examples: :data:`TASK_COUNTS` of each task, no prompt twice, in a seeded shuffled order."""
    rng = random.Random(seed)
    taken: set[str] = set()
    towns = _towns(rng, taken)
    people = _people(rng, taken, towns)
    makers: dict[str, Callable[[random.Random], tuple[str, str]]] = {
        "addition": _addition,
        "subtraction": _subtraction,
        "multiplication": _multiplication,
        "division": _division,
        "word_problem": _word_problem,
        "conversion": _conversion,
        "sorting": _sorting,
        "letters": _letters,
        "categories": _categories,
        "towns": lambda r: _town_fact(r, towns),
        "people": lambda r: _person_fact(r, people),
        "rewriting": _rewriting,
    }
    examples, prompts = [], set()
    for task, count in TASK_COUNTS.items():
        made = 0
        for _ in range(100 * count):  # bounded: a task with too few distinct prompts fails loudly below
            prompt, response = makers[task](rng)
            if prompt in prompts:
                continue
            prompts.add(prompt)
            examples.append({"prompt": prompt, "response": response, "task": task})
            made += 1
            if made == count:
                break
        else:
            raise RuntimeError(f"task {task!r} produced only {made} distinct prompts of {count}")
    rng.shuffle(examples)
    return examples


def make_tokenizer(examples: list[dict[str, str]]):
    """A byte-level BPE of :data:`VOCAB_SIZE` tokens trained on the prompts and responses, laid out as Llama-3's.

    Llama-3's pre-tokenizer: a regex split (words with their leading space, numbers in chunks of at most three
    digits, punctuation runs, whitespace) then the byte-to-unicode map, so every byte string encodes and decodes
    back exactly. ``min_frequency=1``: 500 templated examples repeat too few words to reach 2048 tokens with pairs
    seen twice (about 1800); the last merges join pairs seen once (ties are broken by the pair, deterministically).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: no text is unencodable
        show_progress=False,
    )
    tokenizer.train_from_iterator((text for e in examples for text in (e["prompt"], e["response"])), trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B:1", special_tokens=[(BOS, tokenizer.token_to_id(BOS))]
    )
    return tokenizer


def _dump(data: object, indent: int | None = 2) -> str:
    return json.dumps(data, indent=indent, sort_keys=True, ensure_ascii=False) + "\n"


def write_assets(out: Path) -> dict[str, int]:
    """Write the four asset files into ``out``; returns their sizes in bytes."""
    out.mkdir(parents=True, exist_ok=True)
    examples = make_examples()
    tokenizer = make_tokenizer(examples)
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    if vocab != VOCAB_SIZE:
        raise RuntimeError(f"the tokenizer has {vocab} tokens, not {VOCAB_SIZE}: the examples have too few merges")
    ids = {token: tokenizer.token_to_id(token) for token in (BOS, EOT, PAD)}
    files = {
        "instructions.jsonl": "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in examples),
        # tokenizers' own JSON with sorted keys (the bytes do not depend on its field order), on one line
        "tokenizer.json": _dump(json.loads(tokenizer.to_str()), indent=None),
        "tokenizer_config.json": _dump(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": BOS,
                "eos_token": EOT,
                "pad_token": PAD,
                "padding_side": "right",
                "model_max_length": MODEL["max_position_embeddings"],
                "clean_up_tokenization_spaces": False,
                "chat_template": CHAT_TEMPLATE,
            }
        ),
        "model_config.json": _dump(
            {
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
                **MODEL,
                "vocab_size": vocab,
                "bos_token_id": ids[BOS],
                "eos_token_id": ids[EOT],
                "pad_token_id": ids[PAD],
            }
        ),
    }
    sizes = {}
    for name, text in files.items():
        path = out / name
        path.write_bytes(text.encode("utf-8"))
        sizes[name] = path.stat().st_size
    return sizes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "fastft" / "bench" / "assets")
    args = parser.parse_args(argv)
    sizes = write_assets(args.out)
    for name, size in sizes.items():
        print(f"{args.out / name}: {size:,} bytes")
    print(f"total {sum(sizes.values()):,} bytes")


if __name__ == "__main__":
    main()
