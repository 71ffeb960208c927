#!/usr/bin/env python3
"""Validate every JSON document of OCI image layouts against the OCI image-spec schemas.

Usage: validate-oci-schemas.py SCHEMA_DIR LAYOUT_DIR...
Checks oci-layout, index.json, and every manifest, index and config blob reachable from it;
prints one line per document and exits 1 if any fails.
"""
import json
import os
import sys

from jsonschema import Draft4Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT4

URIS = {
    "config-schema.json": ["https://opencontainers.org/schema/image/config"],
    "image-index-schema.json": ["https://opencontainers.org/schema/image/index"],
    "image-layout-schema.json": ["https://opencontainers.org/schema/image/layout"],
    "image-manifest-schema.json": ["https://opencontainers.org/schema/image/manifest"],
    "content-descriptor.json": ["https://opencontainers.org/schema/descriptor",
                                "https://opencontainers.org/schema/image/content-descriptor.json"],
    "defs-descriptor.json": ["https://opencontainers.org/schema/defs-descriptor.json",
                             "https://opencontainers.org/schema/image/defs-descriptor.json",
                             "https://opencontainers.org/schema/image/descriptor/mediaType"],
    "defs.json": ["https://opencontainers.org/schema/defs.json",
                  "https://opencontainers.org/schema/image/defs.json",
                  "https://opencontainers.org/schema/image/descriptor/defs.json"],
}


def load(schema_dir):
    registry = Registry()
    schemas = {}
    for name, uris in URIS.items():
        with open(os.path.join(schema_dir, name)) as f:
            doc = json.load(f)
        schemas[name] = doc
        for uri in uris:
            registry = registry.with_resource(uri, Resource(contents=doc, specification=DRAFT4))
    return schemas, registry


def main():
    schema_dir, layouts = sys.argv[1], sys.argv[2:]
    schemas, registry = load(schema_dir)
    validators = {k: Draft4Validator(v, registry=registry) for k, v in schemas.items()}
    failed = 0
    checked = 0

    def check(kind, path, doc):
        nonlocal failed, checked
        checked += 1
        errors = sorted(validators[kind].iter_errors(doc), key=lambda e: list(e.path))
        if errors:
            failed += 1
            for e in errors:
                print(f"FAIL {path} ({kind}): {'/'.join(map(str, e.path))}: {e.message}")
        else:
            print(f"ok   {path} ({kind})")

    for layout in layouts:
        with open(os.path.join(layout, "oci-layout")) as f:
            check("image-layout-schema.json", os.path.join(layout, "oci-layout"), json.load(f))
        index_path = os.path.join(layout, "index.json")
        with open(index_path) as f:
            index = json.load(f)
        check("image-index-schema.json", index_path, index)
        todo = list(index.get("manifests", []))
        while todo:
            desc = todo.pop()
            check("content-descriptor.json", f"{index_path} descriptor {desc.get('digest')}", desc)
            blob = os.path.join(layout, "blobs", *desc["digest"].split(":"))
            with open(blob) as f:
                doc = json.load(f)
            if desc["mediaType"].endswith("image.index.v1+json"):
                check("image-index-schema.json", blob, doc)
                todo.extend(doc.get("manifests", []))
                continue
            check("image-manifest-schema.json", blob, doc)
            config = os.path.join(layout, "blobs", *doc["config"]["digest"].split(":"))
            with open(config) as f:
                check("config-schema.json", config, json.load(f))
    print(f"{checked - failed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
