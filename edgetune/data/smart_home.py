"""The bundled fine-tuning task: short home-automation commands -> one JSON action.

    "dim the kitchen lights to 30% at 7pm"
    -> {"device": "light", "room": "kitchen", "action": "dim", "level": 30, "time": "19:00"}

Small enough for an edge device, strict enough to score by exact match. The
generator is seeded; the held-out split uses (device, action, room)
combinations that never occur in the training split, so it measures whether
the model learned the mapping rather than memorised pairs.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from .jsonl import write_jsonl

ROOMS = [
    "kitchen",
    "living room",
    "bedroom",
    "bathroom",
    "office",
    "garage",
    "hallway",
    "dining room",
    "basement",
    "porch",
]

# device -> action -> phrasings; {room} {level} are filled in, a time may be appended.
PHRASES: dict[str, dict[str, list[str]]] = {
    "light": {
        "on": [
            "turn on the {room} lights",
            "switch on the {room} light",
            "lights on in the {room}",
        ],
        "off": [
            "turn off the {room} lights",
            "switch off the {room} light",
            "lights off in the {room}",
        ],
        "dim": [
            "dim the {room} lights to {level}%",
            "set the {room} lights to {level} percent",
            "{room} lights at {level}%",
        ],
    },
    "thermostat": {
        "set": [
            "set the {room} thermostat to {level} degrees",
            "heat the {room} to {level}",
            "make the {room} {level} degrees",
        ],
        "off": ["turn off the heating in the {room}", "switch off the {room} thermostat"],
    },
    "blinds": {
        "open": ["open the {room} blinds", "raise the blinds in the {room}"],
        "close": ["close the {room} blinds", "lower the blinds in the {room}"],
        "set": ["set the {room} blinds to {level}%", "open the {room} blinds to {level} percent"],
    },
    "lock": {
        "lock": ["lock the {room} door", "lock up the {room}"],
        "unlock": ["unlock the {room} door", "open the lock of the {room} door"],
    },
    "fan": {
        "on": ["turn on the {room} fan", "start the fan in the {room}"],
        "off": ["turn off the {room} fan", "stop the fan in the {room}"],
        "set": ["set the {room} fan to speed {level}", "{room} fan speed {level}"],
    },
    "speaker": {
        "set": ["set the {room} speaker volume to {level}", "{room} music volume {level}"],
        "off": ["mute the {room} speaker", "turn off the music in the {room}"],
    },
}

LEVELS = {
    ("light", "dim"): list(range(10, 100, 10)),
    ("thermostat", "set"): list(range(16, 27)),
    ("blinds", "set"): list(range(10, 100, 10)),
    ("fan", "set"): [1, 2, 3, 4, 5],
    ("speaker", "set"): list(range(5, 55, 5)),
}


def _time_phrase(rng: random.Random) -> tuple[str, str]:
    """A spoken time and its 24-hour form, e.g. ('at 7pm', '19:00')."""
    hour = rng.randint(1, 12)
    minute = rng.choice([0, 0, 15, 30, 45])
    pm = rng.random() < 0.5
    spoken = f"{hour}" if minute == 0 else f"{hour}:{minute:02d}"
    h24 = (hour % 12) + (12 if pm else 0)
    return f"at {spoken}{'pm' if pm else 'am'}", f"{h24:02d}:{minute:02d}"


def make_example(rng: random.Random, device: str, action: str, room: str) -> dict:
    """One chat example for the given (device, action, room)."""
    text = rng.choice(PHRASES[device][action])
    answer: dict[str, object] = {"device": device, "room": room, "action": action}
    level = None
    if (device, action) in LEVELS:
        level = rng.choice(LEVELS[(device, action)])
        answer["level"] = level
    command = text.format(room=room, level=level)
    if rng.random() < 0.4:
        spoken, h24 = _time_phrase(rng)
        command += " " + spoken
        answer["time"] = h24
    if rng.random() < 0.3:
        command = rng.choice(["please ", "could you ", "hey, "]) + command
    return {
        "messages": [
            {"role": "user", "content": command},
            {"role": "assistant", "content": json.dumps(answer)},
        ]
    }


def combinations() -> list[tuple[str, str, str]]:
    return [(d, a, r) for d, actions in PHRASES.items() for a in actions for r in ROOMS]


def split_combinations(seed: int, heldout_fraction: float = 0.2):
    """Disjoint (train, held-out) combination lists; every device, action and room
    still occurs in training, only their pairing is new in held-out."""
    rng = random.Random(seed)
    combos = combinations()
    rng.shuffle(combos)
    n_heldout = int(len(combos) * heldout_fraction)
    heldout, train = combos[:n_heldout], combos[n_heldout:]
    seen = {(d, a) for d, a, _ in train}
    # keep every (device, action) in training, so held-out asks only for new rooms
    moved = [c for c in heldout if (c[0], c[1]) not in seen]
    heldout = [c for c in heldout if c not in moved]
    return train + moved, heldout


def generate(
    out_dir: str | Path, n_train: int = 2000, n_heldout: int = 200, seed: int = 0
) -> tuple[Path, Path]:
    """Write ``train.jsonl`` and ``heldout.jsonl`` in the chat ``messages`` format."""
    rng = random.Random(seed)
    train_c, heldout_c = split_combinations(seed)
    train = [make_example(rng, *rng.choice(train_c)) for _ in range(n_train)]
    heldout = [make_example(rng, *rng.choice(heldout_c)) for _ in range(n_heldout)]
    out_dir = Path(out_dir)
    return (
        write_jsonl(out_dir / "train.jsonl", train),
        write_jsonl(out_dir / "heldout.jsonl", heldout),
    )
