"""JSON files written atomically (a reader never sees half a file)."""
import json
import os


def write_json(path: str, obj, indent: int = 4):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + '.partial'
    with open(tmp, 'w') as f:
        json.dump(obj, f, indent=indent)
    os.replace(tmp, path)
