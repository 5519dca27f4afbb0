"""The networks and the world model they form: pure functions of parameters, no I/O, no devices.

``nets`` (encoders, decoders, RSSM, heads, the implicit-action networks), ``distributions``,
``world_model`` (the image world model both stages share) and ``action_encoders`` (how a real
action reaches the RSSM's action slot in fine-tuning).
"""
