// Package sdkclient holds end-to-end tests that drive a real hsmbridge daemon
// through the official Huawei Cloud Go SDK
// (github.com/huaweicloud/huaweicloud-sdk-go-v3), the client most users of the
// dedicated-keystore API will actually run.
//
// It is a module of its own, nested under testdata/ so that the main module's
// "go build ./..." and "go test ./..." never see it, because the SDK is a very
// large dependency (hundreds of megabytes covering every Huawei Cloud service,
// plus json-iterator, gmsm, mongo-driver and more) that the daemon itself must
// not carry: the main module's go.mod and go.sum stay free of it.
//
// The tests are strictly black box. They import nothing from
// github.com/hsmbridge/hsmbridge; instead they build the daemon binary from the
// repository root with "go build", create a throw-away SoftHSM environment with
// "hsmbridge dev init", start "hsmbridge serve" as a subprocess on a free
// loopback port, and talk to it only over HTTP through the SDK. This checks what
// unit tests cannot: that the SDK's strictly typed decoder accepts every
// response body and that error bodies surface as *sdkerr.ServiceResponseError
// with the right status, error code and request id.
//
// Run it from the repository root with
//
//	cd testdata/sdkclient && go test -count=1 ./...
//
// It needs SoftHSMv2 (/usr/lib/softhsm/libsofthsm2.so, or the path in
// HSMBRIDGE_SOFTHSM_MODULE). Without it the tests are skipped, unless CI=true,
// in which case they fail.
package sdkclient
