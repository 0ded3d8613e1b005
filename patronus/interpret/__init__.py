from patronus.interpret.edits import Edit, activation_range, apply_edits, most_variable_prototypes, parse_edit

__all__ = ["Edit", "activation_range", "apply_edits", "most_variable_prototypes", "parse_edit"]
