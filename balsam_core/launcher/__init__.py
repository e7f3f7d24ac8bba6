"""The pilot launcher: keeps an allocation's nodes busy with tasks (DESIGN §6)."""
