"""The typed config tree: schema (dataclasses), load (YAML + key=value), deepspeed, tree."""
