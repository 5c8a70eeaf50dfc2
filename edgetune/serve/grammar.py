"""placeholder"""
from .errors import bad_request


def constraint(rf, model):
    if rf is None or rf.type == "text":
        return None
    raise bad_request("response_format: not yet", param="response_format")
