/*
 * mxguard embedded virus rules (YARA 4). Each part of a message is scanned
 * separately: decoded MIME parts, zip members and uuencoded blocks. The
 * external "filename" is the part's decoded file name ("" when it has none).
 * meta.threat is the name reported to the sender and in the log.
 */

rule MXG_EICAR_Test_File
{
    meta:
        threat = "EICAR-Test-File"
        source = "EICAR standard anti-virus test file, https://www.eicar.org/download-anti-malware-testfile/"
    strings:
        // The 68-byte EICAR string, in hex so that this file is not itself a test virus.
        $eicar = {
            58 35 4F 21 50 25 40 41 50 5B 34 5C 50 5A 58 35 34 28 50 5E 29 37 43 43
            29 37 7D 24 45 49 43 41 52 2D 53 54 41 4E 44 41 52 44 2D 41 4E 54 49 56
            49 52 55 53 2D 54 45 53 54 2D 46 49 4C 45 21 24 48 2B 48 2A
        }
    condition:
        $eicar
}

rule MXG_Double_Extension_Executable
{
    meta:
        threat = "Double-Extension-Executable"
        description = "an executable or script named to look like a document: invoice.pdf.exe, photo.jpg   .scr"
    condition:
        filename matches /\.(pdf|docx?|docm|xlsx?|xlsm|pptx?|rtf|txt|csv|jpe?g|png|gif|bmp|tiff?|zip|rar|7z|html?|mp3|mp4|avi|wav|eml)[\s._-]*\.(exe|scr|com|pif|bat|cmd|cpl|vbs|vbe|js|jse|wsf|wsh|hta|msi|ps1|lnk|jar|reg|dll)$/i
}

rule MXG_Disguised_Executable
{
    meta:
        threat = "Disguised-Executable"
        description = "a Windows PE executable whose file name does not say so (an .exe renamed .pdf)"
    condition:
        uint16(0) == 0x5A4D and uint32(0x3C) < filesize and uint32(uint32(0x3C)) == 0x00004550
        and filename != ""
        and not (filename matches /\.(exe|dll|scr|com|sys|cpl|ocx|msi|efi|drv|mui)$/i)
}

rule MXG_Office_Macro_Container
{
    meta:
        threat = "Office-Macro-Container"
        description = "an Office document carrying VBA macros (OLE2 _VBA_PROJECT stream, or OOXML vbaProject.bin)"
    strings:
        $ole_vba = "_VBA_PROJECT" wide
        $ole_vba_ascii = "_VBA_PROJECT"
        $ooxml_vba = "vbaProject.bin" nocase
    condition:
        (uint32be(0) == 0xD0CF11E0 and ($ole_vba or $ole_vba_ascii))
        or (uint32be(0) == 0x504B0304 and $ooxml_vba)
}

rule MXG_HTML_Smuggling_Executable
{
    meta:
        threat = "HTML-Smuggling-Executable"
        description = "HTML whose script assembles a Windows executable from base64 and offers it as a download"
    strings:
        $html = "<html" nocase
        $script = "<script" nocase
        $mz_b64_1 = "TVqQAAMAAAAEAAAA"
        $mz_b64_2 = "TVpQAAIAAAAEAA8A"
        $mz_b64_3 = "TVoAAAAAAAAAAAAA"
        $blob = "new Blob" nocase
        $atob = "atob(" nocase
        $url = "createObjectURL" nocase
        $save = "msSaveOrOpenBlob" nocase
        $data_uri = /data:application\/(octet-stream|x-msdownload|x-msdos-program|x-dosexec)[^"'>]{0,40};base64,TV[pq]/ nocase
    condition:
        ($html or $script)
        and ((any of ($mz_b64_*) and ($blob or $atob) and ($url or $save)) or $data_uri)
}
