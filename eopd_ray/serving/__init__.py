"""The teacher as a shared service: a Ray Serve application (app.py), its request, answer and
identity (schema.py) and their encodings on the wire (codec.py), clients for Ray handles and HTTP
(client.py), its metrics (metrics.py), and the adapter that stands where a job's teacher workers
stand (adapter.py)."""
