// Package bench measures hsmbridge against the raw PKCS#11 ceiling on a throwaway SoftHSM
// token (issue 4 §5, DESIGN.md "Performance"). Everything lives in its tests:
//
//	make bench                                   the report: one table, ratios to the ceiling
//	go test -run '^$' -bench . ./internal/bench/  Go benchmarks, one sub-benchmark per concurrency
//
// Paths, for ECDSA P-256 sign, RSA-2048 PKCS#1 v1.5 sign and AES-256-GCM encrypt of 256 bytes:
//
//   - raw: miekg/pkcs11 straight on the token, one session per worker (the ceiling);
//   - hsm: package hsm in process (Cluster.SignDigest / EncryptGCM on its pool);
//   - http: the real daemon binary over HTTP keep-alive (/kms/sign, /kms/encrypt-data);
//   - bare: a bare HTTP server process that answers with a body of the size of
//     encrypt-data's response and never touches the HSM (the HTTP floor for AES).
//
// Nothing here asserts on timings: the numbers are printed, with the targets beside them.
package bench
