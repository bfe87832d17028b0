"""Code generated from proto/dimat.proto by grpcio-tools (see that file for the command). Do not edit."""
