"""The MQTT edge of the agent: the only package that imports paho.

`frontend` turns broker messages into calls on the model manager and results into replies;
`requester` is the client side that the `infer`, `status` and `bench` commands use;
`connection` builds a configured paho client for both.
"""
