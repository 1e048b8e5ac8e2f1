"""Every kind of S3 call the remote copy makes on its prefix (remote.py, docs/remote.md "Minimal S3
permissions"), each run alone through s3fs so that a refusal names the one call refused.

    python tests/s3calls.py     # a SeaweedFS server with identities of one or a few actions each;
                                # prints, for each identity, which calls it is allowed

tests/test_remote_permissions.py runs the same calls with s3server.RUNNER's credentials."""
import os
import sys

PART = 5 << 20  # S3's smallest part but the last; the runner's parts are bigger, the calls the same


def _key(bucket, prefix, *parts):
    return "/".join((bucket, prefix) + parts)


def calls(fs, bucket, prefix, state):
    """[(call, function)] in an order where each finds what the ones before left: the calls
    remote.py makes, as s3fs makes them. Each function takes no argument and raises on a refusal.
    state: a dict shared by the calls ("tmp": a folder for a local file; "upload": the upload left
    in progress)."""
    from fsspec.asyn import sync
    small, big = (_key(bucket, prefix, "small.json"),
                  _key(bucket, prefix, "data", "00000002-0a0b0c0d", "ckpt.pt"))
    upload_prefix = f"{prefix}/data/00000004-01020304/"

    def s3(method, **kw):
        return sync(fs.loop, fs._call_s3, method, **kw)

    def multipart_put():  # s3fs's put_file above its chunk size: Create, UploadPart x2, Complete
        path = os.path.join(state["tmp"], "big")
        with open(path, "wb") as f:
            f.write(os.urandom(PART + 1024))
        fs.put_file(path, big, chunksize=PART)

    def create_upload():  # an upload left in progress, as a killed run leaves it
        state["upload"] = s3("create_multipart_upload", Bucket=bucket,
                             Key=upload_prefix + "ckpt.pt")["UploadId"]
        s3("upload_part", Bucket=bucket, Key=upload_prefix + "ckpt.pt", UploadId=state["upload"],
           PartNumber=1, Body=b"x" * 1024)

    def list_uploads_prefix():
        out = s3("list_multipart_uploads", Bucket=bucket, Prefix=upload_prefix)
        found = [(u["Key"], u["UploadId"]) for u in out.get("Uploads", [])]
        assert (upload_prefix + "ckpt.pt", state["upload"]) in found, found

    # the second page's form: KeyMarker and UploadIdMarker with the prefix
    def list_uploads_paginated():
        s3("list_multipart_uploads", Bucket=bucket, Prefix=upload_prefix, MaxUploads=1,
           KeyMarker=upload_prefix + "ckpt.pt", UploadIdMarker=state["upload"])

    def list_uploads_bucket():  # no Prefix: s3fs's own _list_multipart_uploads (the whole bucket)
        sync(fs.loop, fs._list_multipart_uploads, bucket)

    def abort_upload():
        s3("abort_multipart_upload", Bucket=bucket, Key=upload_prefix + "ckpt.pt",
           UploadId=state["upload"])

    def put_small():
        fs.pipe_file(small, b'{"iter_num": 2}')

    def get_whole():
        assert fs.cat_file(small) == b'{"iter_num": 2}'

    def get_range():
        assert len(fs.cat_file(big, start=10, end=20)) == 10

    def head():
        assert fs.info(small)["size"] == 15

    def list_find():
        fs.invalidate_cache()
        assert small in fs.find(_key(bucket, prefix)), fs.find(_key(bucket, prefix))

    def list_ls():
        fs.invalidate_cache()
        fs.ls(_key(bucket, prefix), detail=False)

    def delete_one():
        fs.rm_file(small)

    # what fs.rm of a prefix sends once it has listed it (ListObjectsV2, above). s3fs's fs.rm
    # ignores the per-key errors of the answer (a refused key is not raised): they are checked here
    def delete_many():
        out = s3("delete_objects", Bucket=bucket,
                 Delete=dict(Objects=[dict(Key=big.split("/", 1)[1])], Quiet=False))
        if out.get("Errors"):
            raise PermissionError(f"DeleteObjects: {out['Errors'][0].get('Code')}: "
                                  f"{out['Errors'][0].get('Message')}")

    return [("PutObject (pipe_file)", put_small),
            ("CreateMultipartUpload+UploadPart+CompleteMultipartUpload (put_file)", multipart_put),
            ("GetObject whole (cat_file)", get_whole),
            ("GetObject ranged (cat_file start/end)", get_range),
            ("HeadObject (info)", head),
            ("ListObjectsV2 Prefix (find)", list_find),
            ("ListObjectsV2 Prefix+Delimiter (ls)", list_ls),
            ("CreateMultipartUpload+UploadPart (left in progress)", create_upload),
            ("ListMultipartUploads Prefix", list_uploads_prefix),
            ("ListMultipartUploads Prefix+KeyMarker+UploadIdMarker", list_uploads_paginated),
            ("ListMultipartUploads whole bucket (no Prefix)", list_uploads_bucket),
            ("AbortMultipartUpload", abort_upload),
            ("DeleteObject (rm_file)", delete_one),
            ("DeleteObjects (rm of a prefix)", delete_many)]


def run_all(fs, bucket, prefix, tmp, setup_fs=None):
    """{call: None if allowed, else the exception's first line}. setup_fs (an identity allowed
    everything): where a refused call would have made something (an object, an upload), setup_fs
    makes it, so that each later call is tried on its own; and it removes what the calls left at the
    end."""
    state = dict(tmp=tmp)
    helper = dict(calls(setup_fs, bucket, prefix, state)) if setup_fs is not None else {}
    results = {}
    for name, call in calls(fs, bucket, prefix, state):
        try:
            call()
            results[name] = None
        except Exception as e:
            results[name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            if helper and name.startswith(("Put", "Create")):
                helper[name]()
    if setup_fs is not None:
        clear(setup_fs, bucket, prefix)
    return results


def clear(fs, bucket, prefix):
    """Nothing left under prefix: no object, no upload in progress."""
    from fsspec.asyn import sync
    for up in sync(fs.loop, fs._list_multipart_uploads, bucket):
        if up["Key"].startswith(prefix + "/"):
            sync(fs.loop, fs._call_s3, "abort_multipart_upload", Bucket=bucket, Key=up["Key"],
                 UploadId=up["UploadId"])
    fs.invalidate_cache()
    if fs.find(_key(bucket, prefix)):
        fs.rm(_key(bucket, prefix), recursive=True)


# identities for the table: name -> actions
TRIED = {
    "Read:b": ["Read:perm-a"],
    "Write:b": ["Write:perm-a"],
    "List:b": ["List:perm-a"],
    "Tagging:b": ["Tagging:perm-a"],
    "Read:b+Write:b+List:b": ["Read:perm-a", "Write:perm-a", "List:perm-a"],
    "Read+Write+List on b/prefix*": ["Read:perm-a/run/*", "Write:perm-a/run/*",
                                     "List:perm-a/run/*"],
    "Read+Write+List on b/prefix (no *)": ["Read:perm-a/run", "Write:perm-a/run",
                                           "List:perm-a/run"],
    "Read+Write (no List)": ["Read:perm-a", "Write:perm-a"],
    "Admin:b": ["Admin:perm-a"],
}


def main():
    import tempfile
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from s3server import S3Server
    folder = tempfile.mkdtemp(prefix="s3calls-")
    extra = [{"name": f"id{i}",
              "credentials": [{"accessKey": f"AKIDTRY{i:04d}", "secretKey": f"secret-{i}"}],
              "actions": actions} for i, actions in enumerate(TRIED.values())]
    server = S3Server(folder, identities=extra)
    try:
        admin = server.fs()
        for b in ("perm-a", "perm-b"):
            server.bucket(b)
        names = [name for name, _ in calls(admin, "perm-a", "run", {})]
        for i, (label, actions) in enumerate(TRIED.items()):
            fs = server.fs(f"AKIDTRY{i:04d}", f"secret-{i}")
            for bucket, prefix in (("perm-a", "run"), ("perm-a", "other"), ("perm-b", "run")):
                got = run_all(fs, bucket, prefix, folder, setup_fs=admin)
                print(f"\n== {label} {actions} on {bucket}/{prefix}")
                for name in names:
                    print(f"  {'allowed' if got[name] is None else 'DENIED '}  {name}"
                          + ("" if got[name] is None else f"   [{got[name][:90]}]"))
    finally:
        server.kill()


if __name__ == "__main__":
    main()
