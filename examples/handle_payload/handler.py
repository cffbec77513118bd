from typing import Any
import json


def handle(payload: str) -> Any:
    """Parses the payload as JSON if it can and says how it was processed."""
    print(f"Default handler received: '{payload}'")
    try:
        data = json.loads(payload)
        return {"handler": "default", "processed_data": data, "status": "processed_as_json"}
    except json.JSONDecodeError:
        return {"handler": "default", "original_data": payload, "status": "processed_as_string"}
