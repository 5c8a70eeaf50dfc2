"""A tiny edge app: typed home-automation commands -> JSON actions, with no torch.

edgetune quickstart            # builds edgetune-quickstart/bundle
python examples/edge_app.py edgetune-quickstart/bundle
"""

import json
import sys

from edgetune.runtime import Model


def act(action: dict) -> str:
    """Where a real app would call its device API."""
    when = f" at {action['time']}" if "time" in action else ""
    level = f" to {action['level']}" if "level" in action else ""
    return f"-> {action['device']} in the {action['room']}: {action['action']}{level}{when}"


def main() -> None:
    model = Model.load(sys.argv[1] if len(sys.argv) > 1 else "edgetune-quickstart/bundle")
    print("type a command (empty line to quit)")
    for line in sys.stdin:
        if not line.strip():
            break
        reply = model.chat([{"role": "user", "content": line.strip()}], max_new_tokens=64)
        try:
            print(act(json.loads(reply)))
        except (json.JSONDecodeError, KeyError):
            print(f"?? could not understand: {reply!r}")


if __name__ == "__main__":
    main()
