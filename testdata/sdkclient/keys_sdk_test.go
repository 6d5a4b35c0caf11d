package sdkclient

import (
	"crypto/ecdsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/pem"
	"strings"
	"testing"

	"github.com/huaweicloud/huaweicloud-sdk-go-v3/services/kms/v2/model"
)

// TestKeys_SDK round-trips the key calls issue 4 names through the official SDK:
// CreateKey in a keystore, EncryptData/DecryptData, CreateDatakey/DecryptDatakey, Sign and
// ValidateSignature, and checks the signature independently against ShowPublicKey's key.
func TestKeys_SDK(t *testing.T) {
	d := startDaemon(t)
	c := newAKSKClient(t, d, d.ak, d.sk)
	ks := c.create(t, d, "sdk-keys-01", "dhsm-cluster-1")
	_, err := c.EnableKeyStore(&model.EnableKeyStoreRequest{KeystoreId: ks})
	c.ok(t, "EnableKeyStore", err)

	createKey := func(alias string, spec model.CreateKeyRequestBodyKeySpec) string {
		t.Helper()
		resp, err := c.CreateKey(&model.CreateKeyRequest{Body: &model.CreateKeyRequestBody{
			KeyAlias: alias, KeySpec: &spec, KeystoreId: ptr(ks),
		}})
		c.ok(t, "CreateKey("+alias+")", err)
		if resp.KeyInfo == nil || str(resp.KeyInfo.KeyId) == "" || str(resp.KeyInfo.DomainId) != d.domain || str(resp.KeyInfo.RegionId) == "" {
			t.Fatalf("CreateKey: key_info = %+v\n  last exchange: %s", resp.KeyInfo, c.rt.lastExchange())
		}
		return *resp.KeyInfo.KeyId
	}
	specs := model.GetCreateKeyRequestBodyKeySpecEnum()
	aesKey := createKey("sdk-aes", specs.AES_256)
	ecKey := createKey("sdk-ec", specs.EC_P256)

	aad := "sdk-context"
	enc, err := c.EncryptData(&model.EncryptDataRequest{Body: &model.EncryptDataRequestBody{
		KeyId: aesKey, PlainText: "hello from the SDK", AdditionalAuthenticatedData: &aad,
	}})
	c.ok(t, "EncryptData", err)
	dec, err := c.DecryptData(&model.DecryptDataRequest{Body: &model.DecryptDataRequestBody{
		CipherText: str(enc.CipherText), AdditionalAuthenticatedData: &aad,
	}})
	c.ok(t, "DecryptData", err)
	if str(dec.PlainText) != "hello from the SDK" || str(dec.KeyId) != aesKey {
		t.Errorf("DecryptData = %q with key %q, want the plaintext and key %s", str(dec.PlainText), str(dec.KeyId), aesKey)
	}

	dk, err := c.CreateDatakey(&model.CreateDatakeyRequest{Body: &model.CreateDatakeyRequestBody{KeyId: aesKey}})
	c.ok(t, "CreateDatakey", err)
	if len(str(dk.PlainText)) != 64 {
		t.Fatalf("CreateDatakey plain_text = %q, want 32 bytes in hex", str(dk.PlainText))
	}
	ddk, err := c.DecryptDatakey(&model.DecryptDatakeyRequest{Body: &model.DecryptDatakeyRequestBody{
		KeyId: aesKey, CipherText: str(dk.CipherText), DatakeyCipherLength: "32",
	}})
	c.ok(t, "DecryptDatakey", err)
	if !strings.EqualFold(str(ddk.DataKey), str(dk.PlainText)) {
		t.Errorf("DecryptDatakey data_key = %s, want %s", str(ddk.DataKey), str(dk.PlainText))
	}
	dek, _ := hex.DecodeString(str(dk.PlainText))
	if sum := sha256.Sum256(dek); !strings.EqualFold(str(ddk.DatakeyDgst), hex.EncodeToString(sum[:])) {
		t.Errorf("DecryptDatakey datakey_dgst = %s, want SHA-256 of the DEK", str(ddk.DatakeyDgst))
	}

	digest := sha256.Sum256([]byte("message signed through the SDK"))
	msg := base64.StdEncoding.EncodeToString(digest[:])
	alg := model.GetSignRequestBodySigningAlgorithmEnum().ECDSA_SHA_256
	sig, err := c.Sign(&model.SignRequest{Body: &model.SignRequestBody{KeyId: ecKey, Message: msg, SigningAlgorithm: alg}})
	c.ok(t, "Sign", err)
	valid, err := c.ValidateSignature(&model.ValidateSignatureRequest{Body: &model.VerifyRequestBody{
		KeyId: ecKey, Message: msg, Signature: str(sig.Signature),
		SigningAlgorithm: model.GetVerifyRequestBodySigningAlgorithmEnum().ECDSA_SHA_256,
	}})
	c.ok(t, "ValidateSignature", err)
	if str(valid.SignatureValid) != "true" {
		t.Errorf("ValidateSignature signature_valid = %q, want \"true\"", str(valid.SignatureValid))
	}

	pk, err := c.ShowPublicKey(&model.ShowPublicKeyRequest{Body: &model.OperateKeyRequestBody{KeyId: ecKey}})
	c.ok(t, "ShowPublicKey", err)
	block, _ := pem.Decode([]byte(str(pk.PublicKey)))
	if block == nil {
		t.Fatalf("ShowPublicKey public_key is not PEM: %q", str(pk.PublicKey))
	}
	pub, err := x509.ParsePKIXPublicKey(block.Bytes)
	if err != nil {
		t.Fatalf("public key: %v", err)
	}
	raw, _ := base64.StdEncoding.DecodeString(str(sig.Signature))
	if !ecdsa.VerifyASN1(pub.(*ecdsa.PublicKey), digest[:], raw) {
		t.Error("the SDK's signature does not verify with crypto/ecdsa against ShowPublicKey's key")
	}
}
