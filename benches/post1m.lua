-- wrk script for the 1 MiB upload row: every request is a POST with a 1 MiB body.
wrk.method = "POST"
wrk.body = string.rep("x", 1048576)
wrk.headers["Content-Type"] = "application/octet-stream"
